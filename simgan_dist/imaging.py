"""Moving images between storage form (uint8/uint16 N×H×W×C) and model form (float N×C×H×W in [-1, 1])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_model_input(images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """N×H×W×C integers → N×C×H×W floats in [-1, 1], normalised on `device` (ship uint8, not floats)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    images = images.to(device, non_blocking=True)
    scale = 65535.0 if images.dtype == torch.uint16 else 255.0
    x = images.permute(0, 3, 1, 2).to(dtype) * (2.0 / scale) - 1.0
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_storage(x: torch.Tensor, dtype: np.dtype = np.uint8) -> np.ndarray:
    """N×C×H×W floats in [-1, 1] → N×H×W×C integers, rounded and clipped.

    The cast happens on the device, so a GPU sends 1 byte per pixel to the host, not 4.
    """
    wide = np.dtype(dtype) == np.uint16
    scale = 65535.0 if wide else 255.0
    y = ((x.detach().float().clamp(-1, 1) + 1.0) * (scale / 2.0)).round()
    y = y.to(torch.int32 if wide else torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return y.astype(dtype, copy=False)


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
