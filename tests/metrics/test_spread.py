"""The spread judge (metrics/spread.py) against known answers: geometry, the appearance oracle, a collapse."""

import numpy as np
import pytest
import torch

from simgan_dist.data.render import APPEARANCE_PARTS
from simgan_dist.data.simulate import render_rows
from simgan_dist.metrics.spread import angular_spread_deg, refined_spread


def test_angular_spread_is_the_rms_angle_from_the_mean_direction():
    angle = np.radians(10.0)
    gaze = np.array([[np.sin(angle), 0, -np.cos(angle)], [-np.sin(angle), 0, -np.cos(angle)],
                     [0, np.sin(angle), -np.cos(angle)], [0, -np.sin(angle), -np.cos(angle)]])
    assert angular_spread_deg(gaze) == pytest.approx(10.0, abs=1e-6)
    assert angular_spread_deg(3 * gaze) == pytest.approx(10.0, abs=1e-6)  # lengths do not matter
    assert angular_spread_deg(np.repeat(gaze[:1], 5, 0)) == pytest.approx(0.0, abs=1e-5)


def test_the_appearance_oracle_scatters_less_on_real_eyes_and_a_collapse_is_flagged():
    """The oracle: the synthetic eyes re-rendered with the simulator's real appearance, labels unchanged, must
    judge better than the raw synthetic eyes; eyes all replaced by one image (gaze erased) must not win."""
    synthetic = render_rows("eye", "synthetic", 5, 0, 512)
    oracle = render_rows("eye", "synthetic", 5, 0, 512, appearance=APPEARANCE_PARTS)["image"]
    real = render_rows("eye", "real", 5, 0, 128)["image"]
    before = torch.random.get_rng_state()
    raw = refined_spread(synthetic["image"], synthetic["gaze"], real)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG streams are untouched
    transferred = refined_spread(oracle, synthetic["gaze"], real)
    assert not raw["underfit"] and not transferred["underfit"]
    assert transferred["spread_ratio"] < 0.9 * raw["spread_ratio"], (transferred, raw)
    erased = refined_spread(np.repeat(synthetic["image"][:1], 512, 0), synthetic["gaze"], real)
    assert erased["underfit"] and erased["spread_ratio"] > 10 * raw["spread_ratio"]
    with pytest.raises(ValueError, match="at least 2 refined and 2 real"):
        refined_spread(synthetic["image"], synthetic["gaze"], real[:1])
