"""Single-process SimGAN trainer: plain PyTorch, no Ray.

For quick experiments and as the roofline the distributed trainer is measured against:
bf16 autocast and channels-last on GPU, fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simgan_dist.config import Config
from simgan_dist.core.algorithm import EmaWeights, Schedule, SimGAN, TorchUpdater, make_optimizer
from simgan_dist.core.history import CodedHistory
from simgan_dist.core.host_memory import reuse_freed_memory
from simgan_dist.core.imaging import to_model_input, to_storage, wide_codes
from simgan_dist.core.losses import RefinerLoss
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.data.schema import DatasetError
from simgan_dist.data.splits import drop_validation_rows, holds_out_real
from simgan_dist.metrics.objective import (
    SCORES_FILE,
    Evaluator,
    score_text,
    write_scores,
)
from simgan_dist.train.checkpoint import (
    DISCRIMINATOR_FILE,
    REFINER_FILE,
    STATE_FILE,
    load_data,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from simgan_dist.train.monitor import MetricAverager, RunLog, comparison_grid, progress_line


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


def _device_and_precision(cfg: Config) -> tuple[torch.device, bool]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return device, bf16


def _load_images(uri: str, what: str, cfg: Config) -> np.ndarray:
    from simgan_dist.data.schema import load_numpy

    if not uri:
        raise ValueError(f"data.{what} is not set: give a dataset URI, e.g. --set data.{what}=data/{what}")
    if what == "real" and holds_out_real(cfg):  # the objective's validation rows stay unseen
        rows = load_numpy(uri, cfg.storage, columns=["id", "image"])
        return drop_validation_rows(rows, cfg.data.real_val_fraction)["image"]
    return load_numpy(uri, cfg.storage, columns=["image"])["image"]


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
    reuse_freed_memory()
    folder = Path(folder)
    if synthetic is None:
        synthetic = _load_images(cfg.data.synthetic, "synthetic", cfg)
    if real is None:
        real = _load_images(cfg.data.real, "real", cfg)
    expected = (cfg.model.image_height, cfg.model.image_width, cfg.model.image_channels)
    for name, images in (("synthetic", synthetic), ("real", real)):
        if tuple(images.shape[1:]) != expected:
            raise DatasetError(f"data.{name}: images are {tuple(images.shape[1:])}, the model config expects "
                               f"{expected}")
        if len(images) < cfg.train.batch_size:
            raise DatasetError(f"data.{name}: {len(images)} images, fewer than one batch "
                               f"(train.batch_size {cfg.train.batch_size})")

    torch.manual_seed(cfg.train.seed)
    device, bf16 = _device_and_precision(cfg)
    channels_last = cfg.train.channels_last and device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    refiner = build_refiner(cfg.model).to(device, memory_format=memory_format)
    disc = build_discriminator(cfg.model).to(device, memory_format=memory_format)
    r_opt = make_optimizer(refiner.parameters(), cfg.train, "refiner", device)
    d_opt = make_optimizer(disc.parameters(), cfg.train, "disc", device)
    to_input = functools.partial(to_model_input, device=device, channels_last=channels_last)
    next_synthetic = ArraySampler(synthetic, cfg.train.batch_size, cfg.train.seed + 1, to_input, cfg.train.shuffle)
    next_real = ArraySampler(real, cfg.train.batch_size, cfg.train.seed + 2, to_input, cfg.train.shuffle)
    history = CodedHistory(cfg.train.buffer_size, (cfg.model.image_channels, *expected[:2]),
                           seed=cfg.train.seed + 3, wide=wide_codes(cfg.model), device=device)
    autocast = (functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext)
    ema = EmaWeights(refiner, cfg.train.ema_decay) if cfg.train.ema_decay else None
    algo = SimGAN(
        TorchUpdater(refiner, r_opt), TorchUpdater(disc, d_opt), RefinerLoss(cfg.loss), history,
        Schedule(cfg.train.pretrain_refiner_steps, cfg.train.pretrain_disc_steps, cfg.train.iterations,
                 cfg.train.k_g, cfg.train.k_d),
        next_synthetic, next_real, autocast, ema=ema, disc_noise=cfg.train.disc_noise,
    )
    # What refines: the EMA when there is one (it is what refiner.pt holds).
    refining = ema.module if ema else refiner

    checkpoint = folder / "checkpoint"
    if (checkpoint / STATE_FILE).exists():
        state = load_data(checkpoint / STATE_FILE, str(checkpoint / STATE_FILE))
        saved = load_data(checkpoint / REFINER_FILE, str(checkpoint / REFINER_FILE), device)
        refiner.load_state_dict(state["refiner_training"] if ema else saved)
        if ema:
            ema.module.load_state_dict(saved)
        disc.load_state_dict(load_data(checkpoint / DISCRIMINATOR_FILE, str(checkpoint / DISCRIMINATOR_FILE), device))
        r_opt.load_state_dict(state["refiner_optimizer"])
        d_opt.load_state_dict(state["disc_optimizer"])
        algo.load_state_dict(state["algorithm"])
        history.load_state_dict(state["history"])
        next_synthetic.load_state_dict(state["synthetic_sampler"])
        next_real.load_state_dict(state["real_sampler"])
        set_rng_state(state["rng"])
        print(f"resumed from {checkpoint} at step {algo.global_step}/{algo.total_steps}")

    def save() -> None:
        write_checkpoint(checkpoint, cfg, refining, disc, {
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
    log = RunLog(folder)
    averager = MetricAverager()
    preview_synthetic = synthetic[:8]
    preview_real = real[:8]
    last: dict[str, float] = {}
    images_done, t_report = 0, time.perf_counter()
    bar = tqdm(total=algo.total_steps, initial=algo.global_step, disable=not progress, desc="train",
               unit="step", leave=False)
    while not algo.done:
        phase = algo.phase
        averager.add(algo.advance())
        images_done += cfg.train.batch_size * (cfg.train.k_g + cfg.train.k_d if phase == "adversarial" else 1)
        bar.update(1)
        step = algo.global_step
        scores = {}
        if evaluator is not None and (step % cfg.train.eval_every == 0 or algo.done):
            with autocast():  # the weights refine would use (the EMA when there is one)
                scores = evaluator(refining, device)
            keep_if_best(folder / "best", step, scores, cfg.train.keep_best,
                         lambda best: write_checkpoint(best, cfg, refining, disc))
        if step % cfg.train.report_every == 0 or algo.done or scores:
            elapsed = time.perf_counter() - t_report
            last = {**averager.pop(), "images_per_s": images_done / max(elapsed, 1e-9),
                    "buffer_fill": len(history) / history.capacity, **scores}
            images_done, t_report = 0, time.perf_counter()
            log.write(step, last)
            tqdm.write(progress_line(step, algo.total_steps, phase, last) + score_text(scores))
        if step % cfg.train.image_every == 0 or algo.done:
            with torch.no_grad(), autocast():
                refined = refining(to_input(torch.from_numpy(preview_synthetic)))
            log.image(step, comparison_grid(preview_synthetic, to_storage(refined), preview_real))
        if step % cfg.train.checkpoint_every == 0 or algo.done:
            save()
            if scores:
                write_scores(checkpoint, step, scores)
            else:  # the weights changed since the last score
                (checkpoint / SCORES_FILE).unlink(missing_ok=True)
    bar.close()
    log.close()
    return LocalRun(folder, checkpoint, last)
