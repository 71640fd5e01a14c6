"""Refinement artifacts a viewer sees and a downstream model may learn: a frame along the image
border and ripples (rings around edges), measured against real images.

Pure NumPy. Both measures compare a set of images with real ones, so a number means "more or
less than real eyes have", not an absolute:

* border: the mean gray level and gradient of each one-pixel ring in from the image edge.
  A refiner with zero padding sees black beyond the edge and draws a frame a few rings in
  (its receptive field); real crops have none, so their ring means change smoothly. The
  frame score is the mean |second difference| of the ring means, in gray levels.
* spectrum: the radially averaged power spectrum (mean-removed, Hann-windowed so the image's
  own border does not leak into every frequency), normalised to unit total power; ripples
  show as excess power in a ring of mid frequencies. The distance is the mean absolute log10
  ratio to real's spectrum over the frequencies both sets have.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BORDER_RINGS = 8  # the frame a zero-padded refiner draws sits within its receptive field of the edge
SPECTRUM_BINS = 16


def _gray(images: np.ndarray) -> np.ndarray:
    """N×H×W×C integers → N×H×W float64 (channel mean)."""
    return np.asarray(images, dtype=np.float64).mean(axis=-1)


def ring_distance(height: int, width: int) -> np.ndarray:
    """H×W: each pixel's distance in px to the nearest image edge (0 on the outermost ring)."""
    rows, cols = np.mgrid[:height, :width]
    return np.minimum(np.minimum(rows, height - 1 - rows), np.minimum(cols, width - 1 - cols))


def border_stats(images: np.ndarray, rings: int = BORDER_RINGS) -> dict[str, Any]:
    """The mean gray level and mean gradient magnitude of each of the outer `rings` one-pixel rings.

    `frame_score` is the mean |second difference| of the ring means (gray levels): a smooth
    ramp towards the border scores ~0, a frame drawn a few pixels in scores its contrast.
    """
    gray = _gray(images)
    height, width = gray.shape[1:]
    if min(height, width) < 2 * rings + 2:
        raise ValueError(f"images of {height}x{width} px are too small for {rings} border rings")
    distance = ring_distance(height, width)
    grad_x, grad_y = np.zeros_like(gray), np.zeros_like(gray)
    grad_x[:, :, 1:-1] = (gray[:, :, 2:] - gray[:, :, :-2]) / 2
    grad_y[:, 1:-1] = (gray[:, 2:] - gray[:, :-2]) / 2
    gradient = np.hypot(grad_x, grad_y)
    ring_mean = np.array([gray[:, distance == k].mean() for k in range(rings)])
    ring_gradient = [float(gradient[:, distance == k].mean()) for k in range(1, rings)]  # ring 0: one-sided
    return {
        "ring_mean": [float(v) for v in ring_mean],
        "ring_gradient": ring_gradient,
        "frame_score": float(np.abs(np.diff(ring_mean, 2)).mean()),
    }


def radial_power_spectrum(images: np.ndarray, bins: int = SPECTRUM_BINS) -> dict[str, list[float]]:
    """Mean power per radial frequency bin (cycles/pixel, 0 to 0.5), normalised to sum to 1."""
    gray = _gray(images)
    height, width = gray.shape[1:]
    gray = gray - gray.mean(axis=(1, 2), keepdims=True)
    gray = gray * np.outer(np.hanning(height), np.hanning(width))
    power = (np.abs(np.fft.fft2(gray)) ** 2).mean(axis=0)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    radius = np.hypot(fy, fx)
    edges = np.linspace(0.0, 0.5, bins + 1)
    which = np.digitize(radius, edges[1:-1])  # bin 0 holds DC (removed above) and the lowest frequencies
    inside = radius <= 0.5
    totals = np.bincount(which[inside], weights=power[inside], minlength=bins)
    counts = np.bincount(which[inside], minlength=bins)
    spectrum = totals / np.maximum(counts, 1)
    spectrum = spectrum / max(spectrum.sum(), 1e-30)
    return {"frequency": [float(f) for f in (edges[:-1] + edges[1:]) / 2], "power": [float(p) for p in spectrum]}


def spectrum_distance(spectrum: dict[str, list[float]], reference: dict[str, list[float]]) -> float:
    """Mean |log10(power / reference power)| over the bins (0: the same shape as the reference)."""
    a, b = np.asarray(spectrum["power"]), np.asarray(reference["power"])
    keep = (a > 0) & (b > 0)
    return float(np.abs(np.log10(a[keep] / b[keep])).mean())


def artifact_metrics(sets: dict[str, np.ndarray], reference: str = "real") -> dict[str, Any]:
    """Border rings and the radial spectrum of each named image set, and each set's distance to
    `reference` (frame score minus the reference's; spectrum distance)."""
    border = {name: border_stats(images) for name, images in sets.items()}
    spectra = {name: radial_power_spectrum(images) for name, images in sets.items()}
    versus = {
        name: {
            "frame_score_excess": border[name]["frame_score"] - border[reference]["frame_score"],
            "spectrum_log_distance": spectrum_distance(spectra[name], spectra[reference]),
        }
        for name in sets if name != reference
    }
    return {
        "method": (f"border: mean gray level and central-difference gradient magnitude of each of the outer "
                   f"{BORDER_RINGS} one-pixel rings; frame score = mean |second difference| of the ring means "
                   "(gray levels). Spectrum: radially averaged power of the mean-removed, Hann-windowed image in "
                   f"{SPECTRUM_BINS} bins from 0 to 0.5 cycles/px, normalised to unit sum; distance = mean "
                   "|log10 ratio| to the reference's"),
        "reference": reference,
        "border": border,
        "spectrum": spectra,
        f"vs_{reference}": versus,
    }
