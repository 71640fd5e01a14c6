"""SimGAN losses (paper eq. 2–4): local adversarial loss and self-regularization."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from simgan_dist.config import LossConfig

REAL, REFINED = 0, 1

Psi = Callable[[torch.Tensor], torch.Tensor]


def local_adversarial_loss(logits: torch.Tensor, label: int, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of every patch of D's N×2×h×w map against one class.

    "mean" averages over images and patches; "sum" sums over patches and averages over
    images (the paper's Σ over the w×h map, per image).
    """
    targets = torch.full((logits.shape[0], *logits.shape[2:]), label, dtype=torch.long, device=logits.device)
    per_patch = F.cross_entropy(logits.float(), targets, reduction="none")
    if reduction == "sum":
        return per_patch.flatten(1).sum(1).mean()
    return per_patch.mean()


def patch_accuracy(logits: torch.Tensor, label: int) -> torch.Tensor:
    """Share of patches D assigns to `label`."""
    return (logits.argmax(1) == label).float().mean()


def make_psi(name: str, downsample: int = 4) -> Psi:
    """ψ maps images to the space where refined and synthetic must stay close."""
    if name == "identity":
        return lambda x: x
    if name == "channel_mean":
        # Colour may change between domains; the per-pixel mean over channels may not.
        return lambda x: x.mean(dim=1, keepdim=True)
    if name == "downsample":
        return lambda x: F.avg_pool2d(x, downsample, ceil_mode=True)
    raise ValueError(f"unknown psi {name!r}: identity, channel_mean or downsample")


def self_regularization_loss(refined: torch.Tensor, synthetic: torch.Tensor, psi: Psi,
                             reduction: str = "sum") -> torch.Tensor:
    """‖ψ(R(x)) − ψ(x)‖₁ per image, averaged over the batch.

    "sum" is the paper's form: summed over ψ's pixels, so its size (and λ's meaning)
    depends on the image size (1,925 pixels for a 35x55 eye). "mean" is the per-pixel mean
    absolute change in model units ([-1, 1], so 0.01 ≈ 1.3 gray levels): λ = 1 then weighs
    one unit of mean change like one nat of the adversarial loss, at any image size.
    λ_sum = λ_mean / pixels gives the same training.
    """
    diff = (psi(refined) - psi(synthetic)).abs().float().flatten(1)
    return (diff.mean(1) if reduction == "mean" else diff.sum(1)).mean()


class RefinerLoss:
    """L_R = adversarial(D(R(x)) → real) + λ · self-regularization."""

    def __init__(self, cfg: LossConfig):
        self.lambda_reg = cfg.lambda_reg
        self.reduction = cfg.adv_reduction
        self.reg_reduction = cfg.reg_reduction
        self.psi = make_psi(cfg.psi, cfg.psi_downsample)

    def regularization(self, refined: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
        return self_regularization_loss(refined, synthetic, self.psi, self.reg_reduction)

    def adversarial(self, refined_logits: torch.Tensor) -> torch.Tensor:
        return local_adversarial_loss(refined_logits, REAL, self.reduction)
