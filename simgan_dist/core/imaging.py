"""Moving images between storage form (uint8/uint16 N×H×W×C) and model form (float N×C×H×W in [-1, 1]).

Everything that leaves a device for the host goes through `to_host`: a tensor on a GPU
has no `.numpy()`, and one helper is easy to audit (tests/core/test_imaging.py checks that no
other module calls `.cpu()` / `.numpy()` on tensors).

Eye images (uint8): x = 2·v/255 − 1, the inverse is exact after rounding.
Hand depth (uint16 mm), the paper's preprocessing made relative: the background
(no reading, or farther than the hand) is fixed at +1 (far), the hand's pixels are
depth relative to the hand's centre, scaled to [−1, 1] over a ±`DEPTH_HALF_RANGE_MM`
cube. Dividing raw depth by 65535 instead would put a whole hand in about
[−0.977, −0.96], where bf16 merges 750 and 800 mm and tanh is nearly flat. Depth
inputs stay fp32 whatever `dtype` asks for: under autocast the convolutions still
run in bf16, but the self-regularisation loss compares against exact depths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# NYU-style 300 mm cube around the hand's centre (DeepPrior and successors).
DEPTH_HALF_RANGE_MM = 150.0
BACKGROUND = 1.0


def to_host(x: torch.Tensor) -> np.ndarray:
    """The one device→host copy: any tensor (CUDA, bf16, requiring grad) → a numpy array on the host.

    Cast to a small integer type on the device first where you can (`to_storage` does):
    the copy then moves 1 byte per pixel, not 4.
    """
    x = x.detach()
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16
        x = x.float()
    return x.cpu().numpy()


def _depth_centres(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N×H×W×C float mm → (N per-image hand centres in mm, foreground mask).

    The hand is what lies within one cube depth behind the nearest reading; its centre
    is the median of those depths (robust to the fingers reaching forward).
    """
    valid = depth > 0
    flat = torch.where(valid, depth, torch.inf).flatten(1)
    nearest = flat.amin(1).view(-1, 1, 1, 1)
    hand = valid & (depth <= nearest + 2 * DEPTH_HALF_RANGE_MM)
    centres = torch.where(hand, depth, torch.nan).flatten(1).nanmedian(1).values
    return torch.nan_to_num(centres, nan=0.0), hand


def normalize(images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, channels_last: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """N×H×W×C integers → (N×C×H×W floats in [-1, 1] on `device`, per-image depth centres or None).

    Ship integers, normalise on the device. The centres (uint16 depth only) are what
    `to_storage` needs to turn refined depth back into millimetres.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    images = images.to(device, non_blocking=True)
    centres = None
    if images.dtype == torch.uint16:
        depth = images.to(torch.float32)
        centres, hand = _depth_centres(depth)
        relative = ((depth - centres.view(-1, 1, 1, 1)) / DEPTH_HALF_RANGE_MM).clamp(-1, 1)
        x = torch.where(hand, relative, BACKGROUND).permute(0, 3, 1, 2)
    else:
        x = images.permute(0, 3, 1, 2).to(dtype) * (2.0 / 255.0) - 1.0
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), centres


def to_model_input(images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """N×H×W×C integers → N×C×H×W floats in [-1, 1], normalised on `device` (ship uint8, not floats)."""
    return normalize(images, device, dtype, channels_last)[0]


def to_storage(x: torch.Tensor, dtype: np.dtype = np.uint8, centres: torch.Tensor | None = None) -> np.ndarray:
    """N×C×H×W floats in [-1, 1] → N×H×W×C integers, rounded and clipped, on the host.

    uint16 means depth in mm and needs the `centres` `normalize` returned; pixels at the
    far edge of the cube are background and stored as 0 (no reading), like the paper.
    The cast happens on the device, so a GPU sends 1–2 bytes per pixel to the host, not 4.
    """
    x = x.detach().float().clamp(-1, 1)
    if np.dtype(dtype) == np.uint16:
        if centres is None:
            raise ValueError("uint16 depth needs the hand centres that imaging.normalize returned")
        depth = centres.view(-1, 1, 1, 1).to(x.device) + x * DEPTH_HALF_RANGE_MM
        background = x >= BACKGROUND - 0.5 / DEPTH_HALF_RANGE_MM
        y = torch.where(background, 0.0, depth.round().clamp(0, 65535)).to(torch.int32)
    else:
        y = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return to_host(y.permute(0, 2, 3, 1)).astype(dtype, copy=False)


@torch.no_grad()
def refine_images(refine: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 256,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Storage-form images through `refine` (model form in → model form out, e.g. a refiner) in batches,
    back in storage form (depth around each image's own hand centre)."""
    out = []
    for lo in range(0, len(images), batch_size):
        x, centres = normalize(images[lo:lo + batch_size], device=device, dtype=dtype)
        out.append(to_storage(refine(x), images.dtype, centres))
    return np.concatenate(out)


def wide_codes(model) -> bool:
    """Whether a model's images need 16-bit history codes: depth (the hand architecture) does."""
    return model.architecture == "hand"


def history_codes(x: torch.Tensor, wide: bool) -> torch.Tensor:
    """Model-form images → integer codes for the history buffer, computed on the device.

    uint8 (eyes) is exactly the storage form, half the bytes of fp16; `wide` (depth)
    keeps 16 bits (int16), so D never sees past refined depth coarser than current.
    """
    x = x.detach().float().clamp(-1, 1)
    if wide:
        return (x * 32767.0).round().to(torch.int16)
    return ((x + 1.0) * 127.5).round().to(torch.uint8)


def from_history_codes(codes: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """`history_codes` → model form on `device` (the integers travel, the floats are made there)."""
    codes = codes.to(device, non_blocking=True)
    if codes.dtype == torch.int16:
        return codes.to(dtype) / 32767.0
    return codes.to(dtype) * (2.0 / 255.0) - 1.0


def grid(rows: list[np.ndarray], scale: int = 3, pad: int = 2) -> np.ndarray:
    """Stack image rows (each N×H×W×C integers) into one gray/RGB uint8 picture."""
    n = min(len(r) for r in rows)
    h, w, c = rows[0].shape[1:]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        row = row[:n]
        if row.dtype != np.uint8:
            lo, hi = float(row.min()), float(row.max())
            row = ((row.astype(np.float32) - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = row[j]
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    return canvas[..., 0] if c == 1 else canvas


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(picture).save(tmp)
    tmp.replace(path)
    return path
