"""Procedural two-domain renderers: the embedded stand-in for UnityEyes/MPIIGaze (and NYU hands).

Eyes (35x55 gray uint8):

* *synthetic* — a clean render like UnityEyes: an eyeball whose gaze (yaw, pitch)
  moves a foreshortened iris and pupil, eyelids whose aperture follows the gaze
  pitch, varying skin, sclera and iris tones, head roll; broad gaze distribution.
* *real* — the same geometry and the same label meaning, under an appearance model
  the synthetic renderer lacks: skin texture, an illumination gradient, corneal
  glints, optical blur, gamma/contrast and sensor noise; gaze comes from a narrower,
  clumpier distribution (a few screen regions, mostly looking down, like MPIIGaze).

The gap is appearance only, and local: a fully convolutional refiner can learn to add
texture, blur, noise and glints without moving the pupil, which is what SimGAN needs.

Labels: `gaze` is a unit vector in camera coordinates (x right, y down, z away from
the camera; looking straight into the camera is (0, 0, -1)), `pupil_xy` the pupil
centre in pixels (x right, y down, image frame), `head_pose` (pitch, yaw, roll) in
radians.

Hands (224x224 uint16 depth in mm, `--kind hand`; `--hand-size 64` renders the same scene
through a lens with 64/224 of the focal length, a CPU-sized crop): a palm and five three-segment
fingers as capsules; labels `joints_uvd` (16 joints: u, v in pixels, depth in mm);
the real domain adds depth noise, missing pixels at edges and holes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from simgan_dist.data.schema import Layout

EYE_H, EYE_W = 35, 55
EYE_LAYOUT = Layout((EYE_H, EYE_W, 1), "uint8", {"gaze": (3,), "pupil_xy": (2,), "head_pose": (3,)})
HAND_SIZE = 224
HAND_JOINTS = 16  # wrist + 5 fingers x (base, middle, tip)


def hand_layout(size: int = HAND_SIZE) -> Layout:
    return Layout((size, size, 1), "uint16", {"joints_uvd": (HAND_JOINTS, 3)})


HAND_LAYOUT = hand_layout()
LAYOUTS = {"eye": EYE_LAYOUT, "hand": HAND_LAYOUT}
GAZE_CONVENTION = "camera frame: x right, y down, z away from camera; (0, 0, -1) looks into the camera"

# Real gaze clusters (yaw, pitch) in degrees: regions of a screen below the camera.
REAL_GAZE_CLUSTERS = np.array([[-16.0, -14.0], [-6.0, -9.0], [4.0, -16.0], [12.0, -7.0], [0.0, -2.0]])
REAL_GAZE_STD_DEG = 4.0

_YY, _XX = np.mgrid[0:EYE_H, 0:EYE_W].astype(np.float32)


def gaze_vector(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """(yaw, pitch) in radians → unit gaze vectors N×3 in the camera frame (see module doc)."""
    return np.stack([np.cos(pitch) * np.sin(yaw), -np.sin(pitch), -np.cos(pitch) * np.cos(yaw)], axis=1)


def _u(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float32)


def sample_eye_params(rng: np.random.Generator, n: int, domain: str) -> dict[str, np.ndarray]:
    """Geometry and base tones for n eyes; only the gaze and head-pose priors depend on the domain."""
    if domain == "synthetic":
        yaw = np.radians(rng.uniform(-40, 40, n))
        pitch = np.radians(rng.uniform(-35, 25, n))
        head = np.radians(rng.uniform([-20, -25, -12], [20, 25, 12], (n, 3)))
    else:
        cluster = REAL_GAZE_CLUSTERS[rng.integers(0, len(REAL_GAZE_CLUSTERS), n)]
        yaw, pitch = np.radians(cluster + rng.normal(0, REAL_GAZE_STD_DEG, (n, 2))).T
        head = np.radians(rng.normal(0, [6, 8, 4], (n, 3)))
    gaze = gaze_vector(yaw, pitch).astype(np.float32)
    eyeball = _u(rng, 11.0, 13.0, n)
    cx = (EYE_W - 1) / 2 + _u(rng, -2.0, 2.0, n) + 3.0 * np.sin(head[:, 1]).astype(np.float32)
    cy = (EYE_H - 1) / 2 + _u(rng, -1.5, 1.5, n)
    return {
        "gaze": gaze,
        "head_pose": head.astype(np.float32),
        "cx": cx, "cy": cy,
        "pupil_x": cx + eyeball * gaze[:, 0],
        "pupil_y": cy + eyeball * gaze[:, 1],
        "half_width": _u(rng, 19.0, 23.0, n),
        # Upper lid opens when looking up and droops when looking down, as real lids do.
        "upper_open": _u(rng, 6.0, 10.0, n) + 5.0 * np.sin(pitch).astype(np.float32),
        "lower_open": _u(rng, 4.0, 6.5, n),
        "lid_skew": _u(rng, -0.25, 0.25, n),
        "iris_r": _u(rng, 5.0, 6.0, n),
        "pupil_r": _u(rng, 1.7, 2.7, n),
        "skin": _u(rng, 95.0, 205.0, n),
        "sclera": _u(rng, 175.0, 230.0, n),
        "iris": _u(rng, 45.0, 125.0, n),
        "pupil": _u(rng, 8.0, 25.0, n),
        "crease": _u(rng, 3.0, 5.5, n),
    }


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-ness from a signed distance in pixels (positive inside)."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def render_eye_clean(p: dict[str, np.ndarray]) -> np.ndarray:
    """The clean (synthetic-looking) render: float32 N×35×55 intensities in [0, 255]."""
    col = {k: v[:, None, None] for k, v in p.items() if v.ndim == 1}
    roll = p["head_pose"][:, 2][:, None, None]
    dx, dy = _XX - col["cx"], _YY - col["cy"]
    cos, sin = np.cos(roll), np.sin(roll)
    u = cos * dx + sin * dy  # eye frame: the lids rotate with the head, the gaze label does not
    v = cos * dy - sin * dx
    t = u / col["half_width"]
    shape = np.maximum(1.0 - t * t, 0.0) * (1.0 + col["lid_skew"] * t)
    upper = -col["upper_open"] * shape  # lid curves, v measured downwards
    lower = col["lower_open"] * shape
    inside = _coverage(np.minimum(v - upper, lower - v))

    # Iris and pupil: circles on the eyeball, foreshortened along the gaze direction.
    g = p["gaze"]
    norm = np.hypot(g[:, 0], g[:, 1])
    ex = np.where(norm > 1e-6, g[:, 0] / np.maximum(norm, 1e-6), 1.0)[:, None, None]
    ey = np.where(norm > 1e-6, g[:, 1] / np.maximum(norm, 1e-6), 0.0)[:, None, None]
    squash = np.maximum(-g[:, 2], 0.2)[:, None, None]
    px, py = _XX - col["pupil_x"], _YY - col["pupil_y"]
    along = (px * ex + py * ey) / squash
    across = px * ey - py * ex
    rho = np.sqrt(along * along + across * across)
    iris_cov = _coverage(col["iris_r"] - rho)
    pupil_cov = _coverage(col["pupil_r"] - rho)
    limbus = np.square(np.minimum(rho / col["iris_r"], 1.0))
    limbus = 1.0 - 0.4 * limbus * limbus  # darker iris rim
    iris = col["iris"] * limbus
    eye = col["sclera"] * (1.0 - 0.3 * np.square(t)) * (0.75 + 0.25 * _coverage(v - upper - 1.5))
    eye = eye + iris_cov * (iris - eye)
    eye = eye + pupil_cov * (col["pupil"] - eye)

    # Skin: brighter towards the brow, a crease above the lid, lashes along the upper lid.
    above = upper - v
    skin = col["skin"] * (1.0 - 0.25 * np.exp(-((above - col["crease"]) ** 2) * 0.5))
    skin = skin * (1.0 - 0.55 * np.exp(-np.maximum(above, 0.0) * 1.2) * (v < 0))
    return skin + inside * (eye - skin)


def _smooth_noise(rng: np.random.Generator, n: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise: a coarse random grid bilinearly upsampled to 35×55."""
    grid = rng.standard_normal((n, *cells), dtype=np.float32)
    up_h = _interp_matrix(EYE_H, cells[0])
    up_w = _interp_matrix(EYE_W, cells[1])
    return up_h @ grid @ up_w.T


def _interp_matrix(out: int, cells: int) -> np.ndarray:
    pos = np.linspace(0, cells - 1, out)
    lo = np.minimum(pos.astype(int), cells - 2)
    frac = pos - lo
    m = np.zeros((out, cells), np.float32)
    m[np.arange(out), lo] = 1 - frac
    m[np.arange(out), lo + 1] = frac
    return m


def _blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable 5-tap Gaussian blur with a per-image sigma (edges replicated)."""
    taps = np.exp(-np.square(np.arange(3, dtype=np.float32)) / (2 * np.square(sigma[:, None])))
    taps /= taps[:, :1] + 2 * taps[:, 1:].sum(1, keepdims=True)
    w0, w1, w2 = (taps[:, i, None, None] for i in range(3))
    for axis in (1, 2):
        size = img.shape[axis]
        pad = np.pad(img, [(2, 2) if a == axis else (0, 0) for a in range(3)], mode="edge")
        views = [pad[:, k:k + size] if axis == 1 else pad[:, :, k:k + size] for k in range(5)]
        # Symmetric taps: three multiplies per pass instead of five.
        img = w0 * views[2] + w1 * (views[1] + views[3]) + w2 * (views[0] + views[4])
    return img


APPEARANCE_PARTS = ("texture", "light", "glints", "blur", "camera", "noise")
# What a deterministic refiner of a clean render can reproduce: no fresh per-pixel noise or random texture.
DETERMINISTIC_PARTS = ("light", "glints", "blur", "camera")


def add_real_eye_appearance(img: np.ndarray, p: dict[str, np.ndarray], rng: np.random.Generator,
                            parts: tuple[str, ...] = APPEARANCE_PARTS) -> np.ndarray:
    """What the synthetic renderer lacks: texture, lighting, glints, blur, gamma and sensor noise.

    `parts` switches pieces off (a subset of APPEARANCE_PARTS; "camera" is gamma and
    contrast). Every random draw happens whatever is switched off, so an image keeps
    the same glints, light and blur with or without its texture and noise.
    """
    unknown = set(parts) - set(APPEARANCE_PARTS)
    if unknown:
        raise ValueError(f"unknown appearance parts {sorted(unknown)}: choose from {APPEARANCE_PARTS}")
    n = len(img)
    col = lambda a: a[:, None, None]  # noqa: E731
    # Skin/sclera texture: two octaves of smooth noise plus fine pores.
    texture = _smooth_noise(rng, n, (8, 12)) * col(_u(rng, 5.0, 12.0, n))
    texture += _smooth_noise(rng, n, (14, 22)) * col(_u(rng, 2.0, 5.0, n))
    if "texture" in parts:
        img = img + texture
    # Illumination: a random linear gradient (a lamp off to one side) and exposure.
    slope = rng.normal(0.0, 0.35, (n, 2)).astype(np.float32)
    light = 1.0 + col(slope[:, 0]) * (_XX / EYE_W - 0.5) + col(slope[:, 1]) * (_YY / EYE_H - 0.5)
    exposure = col(_u(rng, 0.75, 1.15, n))
    if "light" in parts:
        img = img * light * exposure
    # Corneal glints: one or two bright spots near the pupil, at a per-image light direction.
    for k in range(2):
        gx = p["pupil_x"] + _u(rng, -2.5, 2.5, n)
        gy = p["pupil_y"] + _u(rng, -2.5, 1.5, n)
        amp = _u(rng, 60.0, 160.0, n) * (rng.random(n) < (0.9 if k == 0 else 0.4))
        width = col(-0.5 / _u(rng, 0.35, 0.8, n))
        if "glints" in parts:
            # A Gaussian spot is separable: two 1-D profiles instead of a full-image exp.
            img = img + (col(amp) * np.exp(np.square(_YY[:, :1] - col(gy)) * width)) * np.exp(
                np.square(_XX[:1] - col(gx)) * width)
    img = np.clip(img, 1.0, 255.0)
    sigma_blur = _u(rng, 0.6, 1.3, n)
    if "blur" in parts:
        img = _blur(img, sigma_blur)
    # Camera response: gamma (as exp/log, twice as fast as a per-image power) and lower contrast.
    gamma, contrast = col(_u(rng, 0.7, 1.4, n)), col(_u(rng, 0.65, 0.95, n))
    if "camera" in parts:
        img = 255.0 * np.exp(np.log(img * (1 / 255.0)) * gamma)
        mean = img.mean(axis=(1, 2), keepdims=True)
        img = mean + (img - mean) * contrast
    # Sensor noise: read noise plus shot noise that grows with brightness.
    sigma = np.sqrt(col(_u(rng, 2.0, 6.0, n)) ** 2 + 0.04 * np.maximum(img, 0.0))
    noise = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return img + noise if "noise" in parts else img


def render_eyes(rng: np.random.Generator, n: int, domain: str,
                appearance: tuple[str, ...] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n eyes of a domain: uint8 images N×35×55×1 and float32 labels (gaze, pupil_xy, head_pose).

    `appearance` overrides which real-appearance parts are drawn (default: all for the
    real domain, none for synthetic); the geometry and labels depend only on `rng` and
    `domain`, so a synthetic row re-rendered with real appearance keeps its labels.
    """
    p = sample_eye_params(rng, n, domain)
    img = render_eye_clean(p)
    if appearance is None:
        appearance = APPEARANCE_PARTS if domain == "real" else ()
    if appearance:
        img = add_real_eye_appearance(img, p, rng, tuple(appearance))
    images = np.clip(img + 0.5, 0, 255).astype(np.uint8)[..., None]
    labels = {
        "gaze": p["gaze"],
        "pupil_xy": np.stack([p["pupil_x"], p["pupil_y"]], axis=1),
        "head_pose": p["head_pose"],
    }
    return images, labels


# ---------------------------------------------------------------------------------------------
# Hands: depth maps

_FOCAL = 588.0  # NYU's Kinect focal length in pixels: at depth d, 1 mm spans f / d pixels
_FINGER_ANGLES = np.radians([-55.0, -22.0, -7.0, 8.0, 23.0]).astype(np.float32)  # thumb .. little
_FINGER_MM = np.array([[34, 28, 24], [46, 28, 22], [50, 32, 24], [46, 30, 22], [36, 22, 20]], np.float32)
_FINGER_RADIUS_MM = np.array([11.0, 9.0, 9.5, 9.0, 8.0], np.float32)
_PALM_RADIUS_MM = 42.0
HAND_HOLES = 2
EDGE_BAND_PX = 3.5  # at 224 px; scaled with the image
@functools.cache
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def render_hands(rng: np.random.Generator, n: int, domain: str, size: int = HAND_SIZE,
                 kinect: bool | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n hand depth maps (uint16 mm, size x size) and joints_uvd N×16×3 (u, v in pixels, d in mm).

    The palm faces the camera; fingers fan out from its top edge and curl towards
    the camera (shorter in the image, nearer in depth). The real domain has a
    narrower pose distribution and Kinect-like artifacts (0 = no reading). `kinect`
    (default: real only) adds those artifacts to either domain's geometry: synthetic
    with `kinect=True` is the depth appearance oracle, a perfect appearance-only refiner.
    A smaller `size` is the same scene through a proportionally shorter lens.
    """
    f32 = np.float32
    scale = size / HAND_SIZE
    depth = rng.uniform(750, 1000, n).astype(f32)  # far enough for the whole hand to stay in frame
    spin = (rng.uniform(-0.6, 0.6, n) if domain == "synthetic" else rng.normal(0, 0.2, n)).astype(f32)
    curl_max = 1.4 if domain == "synthetic" else 0.8
    curl = rng.uniform(0.0, curl_max, (n, 5, 3)).astype(f32) * np.array([0.6, 1.0, 1.0], f32)
    center = ((np.array([HAND_SIZE / 2, 0.56 * HAND_SIZE]) + rng.uniform(-10, 10, (n, 2))) * scale).astype(f32)
    px_per_mm = scale * _FOCAL / depth
    yy, xx = _pixel_grid(size)

    joints = np.zeros((n, HAND_JOINTS, 3), f32)
    down = np.stack([np.sin(spin), np.cos(spin)], 1)  # image direction from palm centre to wrist
    joints[:, 0, :2] = center + down * (_PALM_RADIUS_MM * px_per_mm)[:, None]
    joints[:, 0, 2] = depth
    capsules = []  # (start uvd, end uvd, radius mm)
    for finger in range(5):
        angle = spin + _FINGER_ANGLES[finger]
        up = -np.stack([np.sin(angle), np.cos(angle)], 1)
        start = np.concatenate([center + up * (0.8 * _PALM_RADIUS_MM * px_per_mm)[:, None], depth[:, None]], 1)
        bend = np.zeros(n, f32)
        for seg in range(3):
            bend += curl[:, finger, seg]
            length = _FINGER_MM[finger, seg]
            end = np.concatenate([start[:, :2] + up * (length * np.cos(bend) * px_per_mm)[:, None],
                                  start[:, 2:] - (length * np.sin(bend))[:, None]], 1)
            joints[:, 1 + 3 * finger + seg] = end
            capsules.append((start, end, _FINGER_RADIUS_MM[finger]))
            start = end

    r2 = (np.square(xx - center[:, 0, None, None]) + np.square(yy - center[:, 1, None, None])) / \
        np.square(_PALM_RADIUS_MM * px_per_mm)[:, None, None]
    surface = np.where(r2 < 1, depth[:, None, None] - 20.0 * np.sqrt(np.maximum(1 - r2, 0)), np.inf)
    for start, end, radius in capsules:
        surface = np.minimum(surface, _capsule_depth(start, end, radius, px_per_mm, xx, yy))
    hand = np.isfinite(surface)
    background = (depth + 350.0)[:, None, None] + 0.4 / scale * (yy - size / 2)  # a tilted wall
    img = np.where(hand, surface, background)
    if domain == "real" if kinect is None else kinect:
        img = _add_real_depth_artifacts(img, hand, rng, scale)
    images = np.clip(np.rint(img), 0, 65535).astype(np.uint16)[..., None]
    return images, {"joints_uvd": joints}


def _capsule_depth(start: np.ndarray, end: np.ndarray, radius_mm: float, px_per_mm: np.ndarray,
                   xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Depth of the near surface of a capsule between two uvd points, inf where it is not."""
    su, sv, sd = (start[:, i, None, None] for i in range(3))
    du, dv, dd = ((end[:, i] - start[:, i])[:, None, None] for i in range(3))
    t = np.clip(((xx - su) * du + (yy - sv) * dv) / np.maximum(du * du + dv * dv, 1e-6), 0.0, 1.0)
    dist2 = np.square(xx - su - t * du) + np.square(yy - sv - t * dv)
    r2 = np.square(radius_mm * px_per_mm)[:, None, None]
    bulge = np.sqrt(np.maximum(r2 - dist2, 0.0)) / px_per_mm[:, None, None]
    return np.where(dist2 < r2, sd + t * dd - bulge, np.inf)


def _add_real_depth_artifacts(img: np.ndarray, hand: np.ndarray, rng: np.random.Generator,
                              scale: float = 1.0) -> np.ndarray:
    """Kinect-like depth: noise growing with depth², a band along the silhouette lost, holes.

    The band is where the sensor's dot pattern straddles the hand's edge: its pixels are rejected,
    so thin fingers thin out or break. It follows the geometry, as a refiner can learn; the holes
    (IR lost on glossy or steep skin) land at random on the hand.
    """
    n, size, _ = img.shape
    yy, xx = _pixel_grid(size)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * (2.85e-6 * np.square(img) + 1.0)
    inner = hand.copy()
    for _ in range(max(1, round(EDGE_BAND_PX * scale))):
        inner &= np.roll(inner, 1, 1) & np.roll(inner, -1, 1) & np.roll(inner, 1, 2) & np.roll(inner, -1, 2)
    img[hand & ~inner] = 0
    flat = hand.reshape(n, -1)
    weights = flat / np.maximum(flat.sum(1, keepdims=True), 1)
    for _ in range(HAND_HOLES):
        pick = np.array([rng.choice(flat.shape[1], p=w) if w.sum() else 0 for w in weights])
        hy, hx = (v.astype(np.float32)[:, None, None] for v in np.divmod(pick, size))
        r = rng.uniform(3, 10, (n, 1, 1)).astype(np.float32) * scale
        img[hand & (np.square(xx - hx) + np.square(yy - hy) < r * r)] = 0
    return img


RENDERERS: dict[str, Callable[[np.random.Generator, int, str], tuple[np.ndarray, dict[str, np.ndarray]]]] = {
    "eye": render_eyes,
    "hand": render_hands,
}
