"""Algorithm 1 of the paper as resumable step functions, independent of how weights update.

The same `SimGAN` drives plain torch optimizers (`TorchUpdater`, single process) and
DeepSpeed engines (an adapter in `train/engines.py`): both expose `forward`, `backward`, `step`
and the bare `module`.

GAN + DeepSpeed pitfall: R's adversarial loss flows through D's *bare module* with D's
parameters frozen, never through D's engine (an engine forward expects that engine's own
backward). The D step sees `R(x)` computed without grad.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from simgan_dist.config import TrainConfig
from simgan_dist.core.losses import REAL, REFINED, RefinerLoss, local_adversarial_loss, patch_accuracy


class Updater(Protocol):
    module: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


class History(Protocol):
    def __len__(self) -> int: ...

    def sample(self, k: int) -> torch.Tensor: ...

    def push(self, images: torch.Tensor) -> object: ...


def make_optimizer(params: Iterable[torch.Tensor], train_cfg: TrainConfig, role: str,
                   device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimizer of R (`role="refiner"`) or D (`"disc"`), from `train.optimizer/betas/lr/lr_disc`.

    Adam with β1 = 0.5 is the usual GAN choice (a short gradient memory lets each network
    follow the other's moves); "sgd" is the paper's plain SGD (β1 is its momentum). D's
    learning rate is `train.lr_disc`, or `train.lr` when that is 0.

    Fused kernels on every device (CUDA and CPU): one kernel per step, and Adam's step counter
    stays a device tensor, so a step never calls `.item()` (the unfused CPU path does, and a
    DeepSpeed step must not sync: tests/train/test_deepspeed_config.py). `device` is where the
    parameters live (other device types get the default, unfused kernels).
    """
    if role not in ("refiner", "disc"):
        raise ValueError(f"role must be 'refiner' or 'disc', got {role!r}")
    lr = train_cfg.lr_disc if role == "disc" and train_cfg.lr_disc > 0 else train_cfg.lr
    fused = {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {}
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train_cfg.betas[0], **fused)
    return torch.optim.Adam(params, lr=lr, betas=tuple(train_cfg.betas), **fused)


class EmaWeights:
    """An exponential moving average of R's weights: refines with the average, not the last swing.

    It copies R exactly during pretraining (so it starts where adversarial training
    starts) and averages with `decay` per R step afterwards.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        # fp32 whatever R trains in: a 1% step is below bf16's resolution.
        self.module = copy.deepcopy(module).float().requires_grad_(False).eval()
        # A module compiled in place (train.compile) keeps its compiled call in the copy, still bound
        # to the original module: the copy would silently run R's current weights. The EMA runs eager.
        if getattr(self.module, "_compiled_call_impl", None) is not None:
            self.module._compiled_call_impl = None

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float | None = None) -> None:
        weight = 1.0 - (self.decay if decay is None else decay)
        for average, current in zip(self.module.parameters(), module.parameters(), strict=True):
            average.lerp_(current.detach().to(average.dtype), weight)
        for average, current in zip(self.module.buffers(), module.buffers(), strict=True):
            average.copy_(current)


class TorchUpdater:
    """A module and its optimizer: the plain-PyTorch side of the `Updater` interface."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module = module
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters take no gradient inside the block (D during the R step)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=False):
            p.requires_grad_(flag)


@dataclass
class Schedule:
    pretrain_refiner_steps: int
    pretrain_disc_steps: int
    iterations: int
    k_g: int
    k_d: int


Batch = Callable[[], torch.Tensor]
Metrics = dict[str, torch.Tensor]


class SimGAN:
    """Pretrain R (self-regularization only), pretrain D, then iterate K_g R steps + K_d D steps.

    `next_synthetic()` / `next_real()` return normalised NCHW batches on the right device.
    Metrics are detached tensors, so a step never waits on the device; callers `.item()`
    them when they report.
    """

    def __init__(self, refiner: Updater, disc: Updater, loss: RefinerLoss, history: History,
                 schedule: Schedule, next_synthetic: Batch, next_real: Batch,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 ema: EmaWeights | None = None, disc_noise: float = 0.0, disc_noise_fade: bool = True):
        self.refiner = refiner
        self.disc = disc
        self.loss = loss
        self.history = history
        self.schedule = schedule
        self.next_synthetic = next_synthetic
        self.next_real = next_real
        self.autocast = autocast
        self.ema = ema
        self.disc_noise = disc_noise
        self.disc_noise_fade = disc_noise_fade
        self.refiner_pretrain_done = 0
        self.disc_pretrain_done = 0
        self.iterations_done = 0

    # -- the three kinds of step -------------------------------------------------------

    def refiner_pretrain_step(self) -> Metrics:
        synthetic = self.next_synthetic()
        with self.autocast():
            refined = self.refiner.forward(synthetic)
            reg = self.loss.regularization(refined, synthetic)
        self.refiner.backward(reg)
        self.refiner.step()
        if self.ema:
            self.ema.update(self.refiner.module, decay=0.0)
        return {"refiner/reg_loss": reg.detach()}

    def _noisy(self, images: torch.Tensor) -> torch.Tensor:
        """D's input with instance noise: std `disc_noise`, fading linearly to 0 over the iterations
        with `disc_noise_fade`."""
        if not self.disc_noise:
            return images
        std = self.disc_noise
        if self.disc_noise_fade:
            std *= max(0.0, 1.0 - self.iterations_done / max(1, self.schedule.iterations))
        return images + std * torch.randn_like(images)

    def refiner_step(self) -> Metrics:
        synthetic = self.next_synthetic()
        with self.autocast():
            refined = self.refiner.forward(synthetic)
            with frozen(self.disc.module):
                logits = self.disc.module(self._noisy(refined))
            adv = self.loss.adversarial(logits)
            reg = self.loss.regularization(refined, synthetic)
            total = adv + self.loss.lambda_reg * reg
        self.refiner.backward(total)
        self.refiner.step()
        if self.ema:
            self.ema.update(self.refiner.module)
        return {
            "refiner/loss": total.detach(),
            "refiner/adv_loss": adv.detach(),
            "refiner/reg_loss": reg.detach(),
        }

    def disc_step(self) -> Metrics:
        synthetic = self.next_synthetic()
        real = self.next_real()
        half = len(synthetic) // 2
        with torch.no_grad(), self.autocast():
            current = self.refiner.module(synthetic[: len(synthetic) - half])
        fake = current
        if len(self.history):
            past = self.history.sample(half).to(current.device, current.dtype, non_blocking=True)
            fake = torch.cat([current, past])
        with self.autocast():
            logits = self.disc.forward(self._noisy(torch.cat([real, fake])))
            logits_real, logits_fake = logits[: len(real)], logits[len(real):]
            loss_real = local_adversarial_loss(logits_real, REAL, self.loss.reduction)
            loss_fake = local_adversarial_loss(logits_fake, REFINED, self.loss.reduction)
            total = loss_real + loss_fake
        self.disc.backward(total)
        self.disc.step()
        self.history.push(current[:half])
        return {
            "disc/loss": total.detach(),
            "disc/acc_real": patch_accuracy(logits_real.detach(), REAL),
            "disc/acc_refined": patch_accuracy(logits_fake.detach(), REFINED),
        }

    # -- the schedule ------------------------------------------------------------------

    @property
    def phase(self) -> str:
        s = self.schedule
        if self.refiner_pretrain_done < s.pretrain_refiner_steps:
            return "pretrain_refiner"
        if self.disc_pretrain_done < s.pretrain_disc_steps:
            return "pretrain_disc"
        if self.iterations_done < s.iterations:
            return "adversarial"
        return "done"

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def global_step(self) -> int:
        return self.refiner_pretrain_done + self.disc_pretrain_done + self.iterations_done

    @property
    def total_steps(self) -> int:
        s = self.schedule
        return s.pretrain_refiner_steps + s.pretrain_disc_steps + s.iterations

    def advance(self) -> Metrics:
        """Run the next unit of Algorithm 1: one pretraining step or one full iteration."""
        phase = self.phase
        if phase == "pretrain_refiner":
            metrics = self.refiner_pretrain_step()
            self.refiner_pretrain_done += 1
        elif phase == "pretrain_disc":
            metrics = self.disc_step()
            self.disc_pretrain_done += 1
        elif phase == "adversarial":
            metrics = {}
            for _ in range(self.schedule.k_g):
                metrics.update(self.refiner_step())
            for _ in range(self.schedule.k_d):
                metrics.update(self.disc_step())
            self.iterations_done += 1
        else:
            raise RuntimeError("training schedule is already complete")
        return metrics

    def state_dict(self) -> dict[str, int]:
        return {
            "refiner_pretrain_done": self.refiner_pretrain_done,
            "disc_pretrain_done": self.disc_pretrain_done,
            "iterations_done": self.iterations_done,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.refiner_pretrain_done = state["refiner_pretrain_done"]
        self.disc_pretrain_done = state["disc_pretrain_done"]
        self.iterations_done = state["iterations_done"]
