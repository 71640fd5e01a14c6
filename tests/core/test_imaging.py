"""Storage form ↔ model form, and the one device→host route."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from simgan_dist.core.imaging import DEPTH_HALF_RANGE_MM, normalize, to_host, to_model_input, to_storage

PACKAGE = Path(__file__).resolve().parents[2] / "simgan_dist"


def _host_copies(path: Path) -> list[str]:
    """`x.cpu()` / `x.numpy()` calls in a module (a CUDA tensor has no .numpy(): that crash is what this guards)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("cpu", "numpy"):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.func.attr}()")
    return found


def test_every_device_to_host_copy_goes_through_to_host():
    # checkpoint.py moves state-dict tensors to the host as tensors (torch.save needs them), never to numpy
    allowed = {"imaging.py": {"cpu", "numpy"}, "checkpoint.py": {"cpu"}}
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _host_copies(path)
                 if hit.rsplit(".", 1)[1].rstrip("()") not in allowed.get(path.name, set())]
    assert not offenders, f"use imaging.to_host: {offenders}"
    # the audit itself finds calls (it would not pass vacuously)
    assert len(_host_copies(PACKAGE / "core" / "imaging.py")) >= 2


def test_to_host_takes_bf16_and_tensors_that_require_grad():
    x = torch.linspace(-1, 1, 6, requires_grad=True)
    assert to_host(x * 2).dtype == np.float32
    assert to_host(x.to(torch.bfloat16)).dtype == np.float32


def test_eye_images_round_trip_exactly_and_keep_the_arithmetic():
    images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    x = to_model_input(images)
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0)
    assert x.min() == -1 and x.max() == 1
    assert np.array_equal(to_storage(x), images)
    # bf16 keeps all 256 levels apart
    assert len(torch.unique(to_model_input(images, dtype=torch.bfloat16))) == 256


def _hand(depths_mm: list[int], background_mm: int = 1400) -> np.ndarray:
    """One 16x16 depth map: a block of hand pixels per given depth, a wall behind, one missing pixel."""
    img = np.full((1, 16, 16, 1), background_mm, np.uint16)
    for i, d in enumerate(depths_mm):
        img[0, 4 + i, 4:12] = d
    img[0, 0, 0] = 0  # no reading
    return img


def test_distinct_hand_depths_stay_distinct_in_fp32_and_bf16():
    depths = [750, 751, 760, 800, 850]
    img = _hand(depths)
    x, centres = normalize(img, dtype=torch.bfloat16)
    assert x.dtype == torch.float32  # depth stays fp32 whatever the compute dtype
    hand = [x[0, 0, 4 + i, 4].item() for i in range(len(depths))]
    assert len(set(hand)) == len(depths) and all(-1 <= v < 1 for v in hand)
    # even rounded to bf16 (what autocast feeds the first convolution) 1 mm apart stays apart
    assert len(set(torch.tensor(hand).to(torch.bfloat16).tolist())) == len(depths)
    # the old scheme (depth / 65535) merged 750 and 800 mm in bf16: the bug this replaces
    old = torch.tensor([750, 800]) * (2 / 65535) - 1
    assert old.to(torch.bfloat16).unique().numel() == 1
    # relative to the hand's centre, scaled over the cube: spread over the range, not squeezed at -0.97
    assert max(hand) - min(hand) == pytest.approx(100 / DEPTH_HALF_RANGE_MM, abs=1e-6)
    assert centres.item() == pytest.approx(np.median(np.repeat(depths, 8)))
    # background (the wall, and the missing pixel) is fixed, at the far end
    assert x[0, 0, 0, 0] == 1 and x[0, 0, 15, 15] == 1


def test_hand_depth_round_trips_to_millimetres_and_the_background_to_zero():
    img = _hand([700, 720, 745, 790, 830], background_mm=1500)
    x, centres = normalize(img)
    back = to_storage(x, np.uint16, centres)
    hand = img < 1000
    hand[0, 0, 0] = False
    assert np.array_equal(back[hand], img[hand])
    assert (back[~hand] == 0).all()
    with pytest.raises(ValueError, match="centres"):
        to_storage(x, np.uint16)
    # the centre is per image: the same hand 300 mm farther normalises to the same input
    x_far, _ = normalize(np.where(img > 0, img + 300, 0).astype(np.uint16))
    assert torch.allclose(x_far, x)
