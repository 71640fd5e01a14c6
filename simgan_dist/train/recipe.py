"""What both trainers build from a config: precision, the networks, Algorithm 1's steps, the EMA
and when to report, evaluate, save images and checkpoint.

`train --local` (local.py) and every Ray worker (worker.py) take these from here, so a change to
the recipe is made once. How weights update (torch optimizers or DeepSpeed engines), where
batches come from and how checkpoints are stored stay with each trainer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simgan_dist.config import Config, TrainConfig
from simgan_dist.core.algorithm import Batch, EmaWeights, History, Schedule, SimGAN, Updater, make_optimizer
from simgan_dist.core.imaging import to_model_input, to_storage
from simgan_dist.core.losses import RefinerLoss
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.train.monitor import comparison_grid

PREVIEW = 8  # images per row of a preview grid

@dataclass(frozen=True)
class Precision:
    """Where and how the networks compute: bf16 autocast and channels-last on GPU ("auto"), fp32 on CPU."""

    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def choose(cls, train: TrainConfig, device: torch.device) -> Precision:
        on_gpu = device.type == "cuda"
        return cls(device, train.precision == "bf16" or (train.precision == "auto" and on_gpu),
                   train.channels_last and on_gpu)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """fp32 weights, bf16 convolutions. DeepSpeed engines autocast their own forward; the bare-module
        calls (R's adversarial loss, the D step's refined half, evaluations) need this context."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_input(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Stored images → the networks' input on the device; fp32, so the regularisation loss
        compares exact values while autocast runs the convolutions in bf16."""
        return to_model_input(images, self.device, channels_last=self.channels_last)


def use_deterministic_kernels(train: TrainConfig) -> tuple[bool, bool, bool, bool] | None:
    """With train.deterministic, only kernels that give the same bits on every run: no cuDNN
    autotuning, and cuBLAS with a fixed workspace (read when its first handle is made, so call this
    before any matmul: before the evaluator fits its realism network). These are process-wide;
    returns the settings replaced (None when off) for `deterministic_kernels` to put back.

    torch's deterministic mode also fills every new uninitialised tensor (torch.empty) with NaN, a
    debugging aid that reproducible bits do not need: it made each step of a 2-worker ZeRO-2 run
    take seconds (DeepSpeed allocates its flat gradient buckets anew each step), so it is off."""
    if not train.deterministic:
        return None
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic, torch.utils.deterministic.fill_uninitialized_memory)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    return previous


@contextlib.contextmanager
def deterministic_kernels(train: TrainConfig) -> Iterator[None]:
    """`use_deterministic_kernels` for a block (a run inside a longer process: `train --local`, tests)."""
    previous = use_deterministic_kernels(train)
    try:
        yield
    finally:
        if previous is not None:
            algorithms, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, fill = previous
            torch.use_deterministic_algorithms(algorithms)
            torch.utils.deterministic.fill_uninitialized_memory = fill


def build_networks(cfg: Config, device: torch.device,
                   memory_format: torch.memory_format = torch.contiguous_format
                   ) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    """R, then D, each with its optimizer (`algorithm.make_optimizer`), identical on every rank:
    seeded from train.seed. A generator, so DeepSpeed can wrap R before D is built, as it always has."""
    torch.manual_seed(cfg.train.seed)
    for role, build in (("refiner", build_refiner), ("disc", build_discriminator)):
        module = build(cfg.model).to(device, memory_format=memory_format)
        yield module, make_optimizer(module.parameters(), cfg.train, role, device)


def make_ema(train: TrainConfig, refiner: nn.Module) -> EmaWeights | None:
    """R's moving average (train.ema_decay; 0 turns it off)."""
    return EmaWeights(refiner, train.ema_decay) if train.ema_decay else None


def make_schedule(train: TrainConfig) -> Schedule:
    return Schedule(train.pretrain_refiner_steps, train.pretrain_disc_steps, train.iterations, train.k_g, train.k_d)


def build_simgan(cfg: Config, refiner: Updater, disc: Updater, history: History, next_synthetic: Batch,
                 next_real: Batch, precision: Precision, ema: EmaWeights | None) -> SimGAN:
    """Algorithm 1 over the trainer's updaters, history buffer and batches."""
    return SimGAN(refiner, disc, RefinerLoss(cfg.loss), history, make_schedule(cfg.train), next_synthetic,
                  next_real, precision.autocast, ema=ema, disc_noise=cfg.train.disc_noise,
                  disc_noise_fade=cfg.train.disc_noise_fade)


def refining(algo: SimGAN) -> nn.Module:
    """The weights refiner.pt holds and refine, previews and evaluations use: the EMA when there is one."""
    return algo.ema.module if algo.ema else algo.refiner.module


def evaluate(evaluator, refiner: nn.Module, precision: Precision) -> dict[str, float]:
    """The objective's scores of `refiner`, computed as in training (bf16 convolutions under autocast)."""
    with precision.autocast():
        return evaluator(refiner, precision.device)


def preview_grid(refiner: nn.Module, precision: Precision, synthetic: np.ndarray, real: np.ndarray | None
                 ) -> np.ndarray:
    """synthetic | refined | real, as the model sees them (depth shown normalised around the hand)."""
    with torch.no_grad():
        x = precision.to_input(synthetic)
        rows = [to_storage(x), to_storage(refiner(x))]
        rows.append(to_storage(precision.to_input(real)) if real is not None else None)
    return comparison_grid(*rows)


@dataclass(frozen=True)
class Cadence:
    """When a trainer reports, evaluates, saves a preview and checkpoints (train.*_every, in steps);
    the last step does all of them."""

    report_every: int
    eval_every: int  # 0: never
    image_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, train: TrainConfig) -> Cadence:
        return cls(train.report_every, train.eval_every, train.image_every, train.checkpoint_every)

    def should_eval(self, step: int, done: bool) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or done)

    def should_report(self, step: int, done: bool) -> bool:
        """Every evaluation is reported too."""
        return step % self.report_every == 0 or done or self.should_eval(step, done)

    def should_save_images(self, step: int, done: bool) -> bool:
        return step % self.image_every == 0 or done

    def should_checkpoint(self, step: int, done: bool) -> bool:
        return step % self.checkpoint_every == 0 or done


class Throughput:
    """Images through the networks per second since the last `restart` (one worker's)."""

    def __init__(self, train: TrainConfig):
        self.train = train
        self.restart()

    def restart(self) -> None:
        self.images, self.clock = 0, time.perf_counter()

    def add(self, phase: str) -> None:
        """Count one `SimGAN.advance()` run in `phase`: an adversarial iteration is K_g + K_d batches."""
        train = self.train
        self.images += train.batch_size * (train.k_g + train.k_d if phase == "adversarial" else 1)

    def images_per_s(self, workers: int = 1) -> float:
        """The rate of `workers` such workers."""
        return self.images * workers / max(time.perf_counter() - self.clock, 1e-9)
