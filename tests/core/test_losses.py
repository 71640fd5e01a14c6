import math

import pytest
import torch

from simgan_dist.config import LossConfig
from simgan_dist.core.losses import REAL, REFINED, RefinerLoss, local_adversarial_loss, make_psi


def test_adversarial_loss_covers_every_patch():
    logits = torch.zeros(2, 2, 4, 9)
    assert local_adversarial_loss(logits, REAL).item() == pytest.approx(math.log(2))
    assert local_adversarial_loss(logits, REAL, "sum").item() == pytest.approx(36 * math.log(2))
    # one confidently wrong patch raises the loss: every patch counts, not just a pooled score
    logits[0, REFINED, 2, 3] = 20.0
    assert local_adversarial_loss(logits, REAL).item() > math.log(2)


def test_labels_real_zero_refined_one():
    logits = torch.zeros(1, 2, 1, 1)
    logits[0, REFINED] = 10.0
    assert local_adversarial_loss(logits, REFINED).item() < 1e-3
    assert local_adversarial_loss(logits, REAL).item() > 9


@pytest.mark.parametrize("name, shape", [("identity", (2, 3, 8, 8)), ("channel_mean", (2, 1, 8, 8)),
                                         ("downsample", (2, 3, 2, 2))])
def test_psi(name, shape):
    assert make_psi(name, 4)(torch.randn(2, 3, 8, 8)).shape == shape


def test_channel_mean_ignores_colour_shift_that_keeps_the_mean():
    x = torch.zeros(1, 3, 4, 4)
    shifted = x + torch.tensor([0.5, -0.5, 0.0]).view(1, 3, 1, 1)
    loss = RefinerLoss(LossConfig(psi="channel_mean"))
    assert loss.regularization(shifted, x).item() == pytest.approx(0.0)
    assert RefinerLoss(LossConfig(psi="identity")).regularization(shifted, x).item() > 0


def test_self_regularization_is_l1_per_image():
    loss = RefinerLoss(LossConfig())
    a = torch.zeros(2, 1, 2, 2)
    b = torch.full((2, 1, 2, 2), 0.5)
    assert loss.regularization(b, a).item() == pytest.approx(2.0)


def test_mean_reduction_is_the_sum_over_pixels_divided_by_their_number():
    refined, synthetic = torch.rand(3, 1, 35, 55) * 2 - 1, torch.rand(3, 1, 35, 55) * 2 - 1
    summed = RefinerLoss(LossConfig(reg_reduction="sum")).regularization(refined, synthetic)
    mean = RefinerLoss(LossConfig(reg_reduction="mean")).regularization(refined, synthetic)
    assert mean.item() == pytest.approx(summed.item() / (35 * 55), rel=1e-5)
    assert mean.item() == pytest.approx((refined - synthetic).abs().mean().item(), rel=1e-5)
