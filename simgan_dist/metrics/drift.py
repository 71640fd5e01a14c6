"""Label preservation: how far refinement moved each image's label, in pixels, without reading labels.

Eyes: the pupil centre, a thresholded dark-pixel centroid measured on both images from one
anchor (`pupil_shift`). Hand depth maps: the centroid of the hand's silhouette
(`silhouette_shift`). `label_drift` is their mean; the objective charges only drift beyond
`drift_tolerance_px` (issue 10's 1.5 px on a 55 px-wide eye, scaled with the image width).

numpy/scipy on host arrays; no Ray.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from simgan_dist.core.imaging import DEPTH_HALF_RANGE_MM

PUPIL_RADIUS = 4  # search window (px) around a pupil in a 35x55 eye; the pupil radius is ~2-3 px
DETECT_CHUNK = 8192  # images per detector chunk (bounds memory at 1M-image scale)
DRIFT_TOLERANCE_PX = 1.5  # on a 55 px-wide eye; scaled with the image width
REFERENCE_WIDTH = 55


# ---------------------------------------------------------------------------------------------
# Pupil detector (eyes)


def _gray(images: np.ndarray) -> np.ndarray:
    """N×H×W×C integers → N×H×W float32 (channel mean)."""
    images = np.asarray(images)
    return images.astype(np.float32).mean(-1) if images.shape[-1] > 1 else images[..., 0].astype(np.float32)


def _disc_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    inside = dy**2 + dx**2 <= radius**2
    return dy[inside], dx[inside]


def pupil_centroid(images: np.ndarray, start_xy: np.ndarray, radius: int = PUPIL_RADIUS,
                   passes: int = 2) -> np.ndarray:
    """Subpixel pupil centres (N×2, x right, y down) by a thresholded dark-pixel centroid.

    Within a disc of `radius` px around the current centre the threshold is halfway
    between the darkest pixel and the disc's median (the iris), and each pixel darker
    than it weighs by how much darker: a half-maximum centroid, indifferent to global
    brightness and contrast, which the refiner is allowed to change. The disc is
    re-centred on the result `passes` times. A light blur (σ 0.7) tames sensor noise
    without biasing a symmetric blob.
    """
    x = gaussian_filter(_gray(images), (0, 0.7, 0.7), mode="nearest")
    n, h, w = x.shape
    dy, dx = _disc_offsets(radius)
    padded = np.pad(x, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    cx, cy = (np.asarray(start_xy, dtype=np.float64)[:, i].copy() for i in (0, 1))
    rows = np.arange(n)[:, None]
    for _ in range(passes):
        sy = np.clip(np.rint(cy).astype(int), 0, h - 1)
        sx = np.clip(np.rint(cx).astype(int), 0, w - 1)
        patch = padded[rows, sy[:, None] + dy + radius, sx[:, None] + dx + radius]
        lo, mid = patch.min(1, keepdims=True), np.median(patch, 1, keepdims=True)
        weight = np.clip((lo + mid) / 2 - patch, 0.0, None)
        total = weight.sum(1)
        found = total > 0  # a flat patch keeps its start
        cy = np.where(found, sy + (weight * dy).sum(1) / np.maximum(total, 1e-12), cy)
        cx = np.where(found, sx + (weight * dx).sum(1) / np.maximum(total, 1e-12), cx)
    return np.stack([cx, cy], axis=1).astype(np.float32)


def detect_pupil(images: np.ndarray, radius: int = PUPIL_RADIUS) -> np.ndarray:
    """Pupil centres (N×2 float32, x right, y down, px) of N×H×W×C eye images, no labels needed.

    The darkest spot after a σ 1.5 blur (pupil plus iris form the darkest blob of an
    eye) seeds `pupil_centroid`. A pupil hidden under a lid cannot be found: the
    detector then returns the darkest other structure (lashes, a corner).
    """
    out = []
    for lo in range(0, len(images), DETECT_CHUNK):
        chunk = images[lo:lo + DETECT_CHUNK]
        coarse = gaussian_filter(_gray(chunk), (0, 1.5, 1.5), mode="nearest")
        flat = coarse.reshape(len(chunk), -1).argmin(1)
        seed = np.stack([flat % coarse.shape[2], flat // coarse.shape[2]], axis=1)
        out.append(pupil_centroid(chunk, seed, radius))
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def pupil_shift(synthetic: np.ndarray, refined: np.ndarray, anchors_xy: np.ndarray | None = None,
                radius: int = PUPIL_RADIUS) -> np.ndarray:
    """Per-pair pupil displacement refined − synthetic (N×2 px) with one estimator on both images.

    Both centroids start from the same anchor (the synthetic image's detected pupil
    unless given), so the two measurements look at the same structure: a refiner
    that darkens some other spot cannot turn into a 30 px "shift". Displacements up
    to about `radius` px are measured in full; larger ones saturate.
    """
    if anchors_xy is None:
        anchors_xy = detect_pupil(synthetic, radius)
    out = []
    for lo in range(0, len(synthetic), DETECT_CHUNK):
        part = slice(lo, lo + DETECT_CHUNK)
        out.append(pupil_centroid(refined[part], anchors_xy[part], radius)
                   - pupil_centroid(synthetic[part], anchors_xy[part], radius))
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


# ---------------------------------------------------------------------------------------------
# Hand silhouette (depth maps)


def silhouette_centroid(depth: np.ndarray) -> np.ndarray:
    """Centroid (N×2, x right, y down, px) of each depth map's hand: the readings within the model's
    depth cube (2 x DEPTH_HALF_RANGE_MM) behind the nearest one, as `imaging.normalize` sees the hand.

    A 0 is no reading, never the hand; the wall behind the hand is farther than the cube. So a
    refined map (its wall stored as 0), a synthetic one (its wall kept) and a real one (readings
    lost along the silhouette and in holes) all give the hand itself.
    """
    d = np.asarray(depth, dtype=np.float32)[..., 0]
    valid = d > 0
    nearest = np.where(valid, d, np.inf).reshape(len(d), -1).min(1)
    near = valid & (d <= (nearest + 2 * DEPTH_HALF_RANGE_MM)[:, None, None])
    count = np.maximum(near.sum((1, 2)), 1)
    ys, xs = np.mgrid[:d.shape[1], :d.shape[2]]
    return np.stack([(near * xs).sum((1, 2)) / count, (near * ys).sum((1, 2)) / count], 1).astype(np.float32)


def silhouette_shift(synthetic: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """Per-pair displacement (N×2 px) of the hand silhouette's centroid, refined − synthetic.

    Joint labels (u, v) are pixel positions on the hand: a refiner that grows, shrinks or
    moves the hand moves this centroid with them.
    """
    return silhouette_centroid(refined) - silhouette_centroid(synthetic)


# ---------------------------------------------------------------------------------------------
# Label drift


def drift_tolerance_px(image_width: int) -> float:
    return DRIFT_TOLERANCE_PX * image_width / REFERENCE_WIDTH


def label_drift(synthetic: np.ndarray, refined: np.ndarray, *, kind: str = "eye",
                pupil_xy: np.ndarray | None = None) -> float:
    """Mean label displacement in px between synthetic images and their refinements.

    Eyes: pupil centres, both measured from the same anchor (`pupil_xy` labels when given,
    else the synthetic image's detected pupil). Hands: the silhouette centroid.
    """
    if kind == "eye":
        shift = pupil_shift(synthetic, refined, pupil_xy)
    elif kind == "hand":
        shift = silhouette_shift(synthetic, refined)
    else:
        raise ValueError(f"label drift: unknown kind {kind!r} (eye or hand)")
    return float(np.linalg.norm(shift, axis=1).mean())
