"""`train --local`: the training recipe (recipe.py) in one process, plain PyTorch, no Ray.

For quick experiments and as the roofline the distributed trainer is measured against:
bf16 autocast and channels-last on GPU, fp32 on CPU.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simgan_dist.config import Config
from simgan_dist.core.algorithm import TorchUpdater
from simgan_dist.core.history import CodedHistory
from simgan_dist.core.host_memory import reuse_freed_memory
from simgan_dist.core.imaging import wide_codes
from simgan_dist.data.roles import check_data_roles
from simgan_dist.data.schema import DatasetError
from simgan_dist.data.splits import drop_validation_rows, holds_out_real
from simgan_dist.metrics.objective import (
    SCORES_FILE,
    Evaluator,
    score_text,
    write_scores,
)
from simgan_dist.tracking import training_run
from simgan_dist.train.checkpoint import (
    DISCRIMINATOR_FILE,
    REFINER_FILE,
    STATE_FILE,
    check_config_changes,
    check_finite,
    load_checkpoint_config,
    load_data,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from simgan_dist.train.monitor import MetricAverager, RunLog, progress_line
from simgan_dist.train.recipe import (
    PREVIEW,
    Cadence,
    Precision,
    Throughput,
    build_networks,
    build_simgan,
    deterministic_kernels,
    evaluate,
    make_ema,
    preview_grid,
    refining,
)


class ArraySampler:
    """Endless epoch-shuffled batches from an in-memory N×H×W×C integer array."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, to_input, shuffle: bool = True):
        if len(images) < batch_size:
            raise ValueError(f"need at least one batch ({batch_size} images), got {len(images)}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.to_input = to_input
        self.shuffle = shuffle
        self.order = self._epoch_order()
        self.position = 0

    def _epoch_order(self) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(len(self.images), generator=self.generator)
        return torch.arange(len(self.images))

    def __call__(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.order):
            self.order = self._epoch_order()
            self.position = 0
        idx = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.to_input(self.images[idx])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"]
        self.position = state["position"]


@dataclass
class LocalRun:
    folder: Path
    checkpoint: Path
    metrics: dict[str, float]


def _load_images(uri: str, what: str, cfg: Config) -> np.ndarray:
    from simgan_dist.data.schema import load_numpy

    if not uri:
        raise ValueError(f"data.{what} is not set: give a dataset URI, e.g. --set data.{what}=data/{what}")
    if what == "real" and holds_out_real(cfg):  # the objective's validation rows stay unseen
        rows = load_numpy(uri, cfg.storage, columns=["id", "image"])
        return drop_validation_rows(rows, cfg.data.real_val_fraction)["image"]
    return load_numpy(uri, cfg.storage, columns=["image"])["image"]


def _check_images(cfg: Config, **corpora: np.ndarray) -> None:
    """Each corpus holds the model's image shape and at least one batch."""
    expected = (cfg.model.image_height, cfg.model.image_width, cfg.model.image_channels)
    for name, images in corpora.items():
        if tuple(images.shape[1:]) != expected:
            raise DatasetError(f"data.{name}: images are {tuple(images.shape[1:])}, the model config expects "
                               f"{expected}")
        if len(images) < cfg.train.batch_size:
            raise DatasetError(f"data.{name}: {len(images)} images, fewer than one batch "
                               f"(train.batch_size {cfg.train.batch_size})")


def keep_if_best(best: Path, step: int, scores: dict[str, float], keep: int, write) -> bool:
    """Keep `keep` weight folders with the lowest objective under `best/step_N`; `write(folder)` writes one."""
    ranked = sorted((json.loads((d / SCORES_FILE).read_text())["objective"], d)
                    for d in best.glob("step_*") if (d / SCORES_FILE).is_file())
    if len(ranked) >= keep and scores["objective"] >= ranked[keep - 1][0]:
        return False
    folder = best / f"step_{step:07d}"
    write(folder)
    write_scores(folder, step, scores)
    for _, worse in ranked[keep - 1:]:
        shutil.rmtree(worse, ignore_errors=True)
    return True


def train_local(cfg: Config, folder: str | Path, synthetic: np.ndarray | None = None,
                real: np.ndarray | None = None, progress: bool = True) -> LocalRun:
    """Run Algorithm 1 in this process; resumes if `folder/checkpoint` exists."""
    with deterministic_kernels(cfg.train):  # process-wide torch settings: the caller gets its own back
        return _train_local(cfg, Path(folder), synthetic, real, progress)


def _train_local(cfg: Config, folder: Path, synthetic: np.ndarray | None, real: np.ndarray | None,
                 progress: bool) -> LocalRun:
    reuse_freed_memory()
    check_data_roles(cfg)
    if synthetic is None:
        synthetic = _load_images(cfg.data.synthetic, "synthetic", cfg)
    if real is None:
        real = _load_images(cfg.data.real, "real", cfg)
    _check_images(cfg, synthetic=synthetic, real=real)

    precision = Precision.choose(cfg.train, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    (refiner, r_opt), (disc, d_opt) = build_networks(cfg, precision.device, precision.memory_format)
    next_synthetic = ArraySampler(synthetic, cfg.train.batch_size, cfg.train.seed + 1, precision.to_input,
                                  cfg.train.shuffle)
    next_real = ArraySampler(real, cfg.train.batch_size, cfg.train.seed + 2, precision.to_input, cfg.train.shuffle)
    image_shape = (cfg.model.image_channels, cfg.model.image_height, cfg.model.image_width)
    history = CodedHistory(cfg.train.buffer_size, image_shape,
                           seed=cfg.train.seed + 3, wide=wide_codes(cfg.model), device=precision.device)
    ema = make_ema(cfg.train, refiner)
    algo = build_simgan(cfg, TorchUpdater(refiner, r_opt), TorchUpdater(disc, d_opt), history, next_synthetic,
                        next_real, precision, ema)

    checkpoint = folder / "checkpoint"
    resuming = (checkpoint / STATE_FILE).exists()
    if resuming:
        check_config_changes(load_checkpoint_config(str(checkpoint)), cfg, str(folder), str(checkpoint))
        state = load_data(checkpoint / STATE_FILE, str(checkpoint / STATE_FILE))
        saved = load_data(checkpoint / REFINER_FILE, str(checkpoint / REFINER_FILE), precision.device)
        check_finite(saved, str(checkpoint / REFINER_FILE))
        refiner.load_state_dict(state["refiner_training"] if ema else saved)
        if ema:
            ema.module.load_state_dict(saved)
        disc.load_state_dict(load_data(checkpoint / DISCRIMINATOR_FILE, str(checkpoint / DISCRIMINATOR_FILE),
                                       precision.device))
        r_opt.load_state_dict(state["refiner_optimizer"])
        d_opt.load_state_dict(state["disc_optimizer"])
        algo.load_state_dict(state["algorithm"])
        history.load_state_dict(state["history"])
        next_synthetic.load_state_dict(state["synthetic_sampler"])
        next_real.load_state_dict(state["real_sampler"])
        set_rng_state(state["rng"])
        print(f"resumed from {checkpoint} at step {algo.global_step}/{algo.total_steps}")

    def save() -> None:
        write_checkpoint(checkpoint, cfg, refining(algo), disc, {
            **({"refiner_training": refiner.state_dict()} if ema else {}),
            "refiner_optimizer": r_opt.state_dict(),
            "disc_optimizer": d_opt.state_dict(),
            "algorithm": algo.state_dict(),
            "history": history.state_dict(),
            "synthetic_sampler": next_synthetic.state_dict(),
            "real_sampler": next_real.state_dict(),
            "rng": rng_state(),
        })

    evaluator = Evaluator.from_config(cfg) if cfg.train.eval_every else None
    with training_run(cfg, resume_from=str(checkpoint) if resuming else None, say=tqdm.write) as tracker:
        log = RunLog(folder, tracker)
        cadence, averager, throughput = Cadence.of(cfg.train), MetricAverager(), Throughput(cfg.train)
        last: dict[str, float] = {}
        bar = tqdm(total=algo.total_steps, initial=algo.global_step, disable=not progress, desc="train",
                   unit="step", leave=False)
        while not algo.done:
            phase = algo.phase
            averager.add(algo.advance())
            throughput.add(phase)
            bar.update(1)
            step, done = algo.global_step, algo.done
            scores = {}
            if evaluator is not None and cadence.should_eval(step, done):
                scores = evaluate(evaluator, refining(algo), precision)
                keep_if_best(folder / "best", step, scores, cfg.train.keep_best,
                             lambda best: write_checkpoint(best, cfg, refining(algo), disc))
            if cadence.should_report(step, done):
                last = {**averager.pop(), "images_per_s": throughput.images_per_s(),
                        "buffer_fill": len(history) / history.capacity, **scores}
                throughput.restart()
                log.write(step, last)
                tqdm.write(progress_line(step, algo.total_steps, phase, last) + score_text(scores))
            if cadence.should_save_images(step, done):
                log.image(step, preview_grid(refining(algo), precision, synthetic[:PREVIEW], real[:PREVIEW]))
            if cadence.should_checkpoint(step, done):
                save()
                tracker.save_run(str(checkpoint))
                tracker.tags({"simgan.checkpoint": str(checkpoint.resolve())})
                if scores:
                    write_scores(checkpoint, step, scores)
                else:  # the weights changed since the last score
                    (checkpoint / SCORES_FILE).unlink(missing_ok=True)
        bar.close()
        log.close()
    return LocalRun(folder, checkpoint, last)
