"""The label-free objective: how real refined images look and how far refinement moved their labels.

Training (every `train.eval_every` steps), Tune (the sweep's metric), checkpoint selection
(`refine --checkpoint RUN_DIR`) and the evaluation report all use this module, so a score
means the same thing everywhere. Nothing here reads `real_test`: the reference real images
are a held-out validation part of the unlabeled real corpus (`data.real_val`, or the rows of
`data.real` picked by `data.real_val_fraction` from a hash of their id, which the training
stream then skips).

    realism = unbiased MMD² between refined and held-out real images in the feature space of a
              gaze CNN fitted to the synthetic labels (`GazeFeatures`; depth maps: a fixed
              random-conv space) (`realism_score`; ~0 = indistinguishable, lower = more real)
    drift   = mean label displacement, px: the pupil centre for eyes (`pupil_shift`), the
              hand silhouette's centroid for depth maps (`silhouette_shift`)
    objective = realism / realism(synthetic) + max(0, drift − tolerance) / tolerance   (lower = better)

The first term is 1 for a refiner that changes nothing and 0 for refined images that are
as real as the real ones, so it has the same scale on every corpus. The tolerance is the
pupil shift issue 10 accepts, 1.5 px on a 55 px-wide eye, scaled with the image width for
other sizes. Drift within it costs nothing: the detector is not exact on real-looking eyes
(re-rendering synthetic eyes with the simulator's own real appearance, labels unchanged,
measures 0.85 px, because glints and blur move a dark-pixel centroid), so a linear penalty
ranked "changed little" above "looks real". Past it, every tolerance's worth of drift costs
as much as all the realism there is to win. An identity refiner scores 1.0; below beats it.

No Ray import: pure numpy/torch, usable in a training worker, a Tune trial or a notebook.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from simgan_dist.config import Config, EvaluateConfig, StorageConfig
from simgan_dist.core.imaging import normalize, to_model_input, to_storage
from simgan_dist.data.splits import load_real_val
from simgan_dist.errors import UserError
from simgan_dist.metrics.gaze import fit_gaze, run_model

PUPIL_RADIUS = 4  # search window (px) around a pupil in a 35x55 eye; the pupil radius is ~2-3 px
DETECT_CHUNK = 8192  # images per detector chunk (bounds memory at 1M-image scale)
DRIFT_TOLERANCE_PX = 1.5  # on a 55 px-wide eye; scaled with the image width
REFERENCE_WIDTH = 55
REALISM_FLOOR = 1e-3  # a synthetic corpus already this close to real leaves no realism to win
FEATURE_NET_ROWS = 4096  # labeled synthetic rows the eyes' realism space (GazeFeatures) learns from
FEATURE_NET_EPOCHS = 8


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
    """Centroid (N×2, x right, y down, px) of each depth map's near half: the hand in front of its wall.

    The threshold sits halfway between the 2nd and 98th depth percentile of each map, so
    it follows the hand's distance and ignores a refiner's global depth offset or noise.
    A 0 is no reading, never the hand: it counts as farther than any reading. Refined depth
    (`imaging.to_storage`) stores its background as 0 where the synthetic map had its wall,
    so its silhouette is what is left, the hand.
    """
    d = np.asarray(depth, dtype=np.float32)[..., 0]
    d = np.where(d > 0, d, 65536.0)
    lo, hi = np.percentile(d.reshape(len(d), -1), [2, 98], axis=1)
    near = d < ((lo + hi) / 2)[:, None, None]
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
# Realism


REALISM_BANDWIDTHS = (0.25, 1.0, 4.0)  # RBF widths, as multiples of the feature dimension


@functools.lru_cache(maxsize=8)
def _feature_convs(channels: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Three fixed random 3x3 conv layers (16, 32, 64 maps), He-initialised from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(16, channels), (32, 16), (64, 32)]
    return tuple((torch.randn(out, inp, 3, 3, generator=generator) * math.sqrt(2.0 / (inp * 9))).to(device)
                 for out, inp in shapes)


def realism_features(images: np.ndarray | torch.Tensor, seed: int = 0) -> torch.Tensor:
    """N×D float32 features: per-channel spatial mean, std and max of each random conv layer + a 4x4 thumbnail.

    Mean/std of random filter responses capture texture, noise, blur and contrast (what
    a refiner changes); the max captures small local structures a mean over the whole
    image dilutes (corneal glints); the thumbnail captures the lighting layout. Fixed random weights
    need no training and no download, are identical in every process for a seed, and
    cost well under a second for thousands of eye images on a CPU.
    """
    x = _as_model_input(images)
    parts = [F.adaptive_avg_pool2d(x, (4, 4)).flatten(1)]
    for i, weight in enumerate(_feature_convs(x.shape[1], seed, str(x.device))):
        x = F.relu(F.conv2d(x, weight, stride=1 if i == 0 else 2, padding=1))
        parts += [x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3))]
    return torch.cat(parts, 1)


def _as_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Storage form (N×H×W×C integers) or model form (N×C×H×W floats in [-1, 1]) → float32 model form."""
    if isinstance(images, np.ndarray):
        return to_model_input(images)
    if images.is_floating_point():
        return images.detach().float()
    return to_model_input(images, device=images.device)


class GazeFeatures:
    """The realism space for eyes: the penultimate layer of a small gaze CNN trained on the synthetic labels.

    A refined corpus helps a gaze estimator on real eyes when refined and real eyes look alike
    in the features a gaze estimator reads, not in texture statistics: scored in the random
    `realism_features` space, the objective ranked neither the checkpoints along a training
    run nor the trials of a sweep like the downstream error (Spearman 0.41 and 0.41; in this
    space 0.69 and 0.69, bench/RESULTS.md). Only synthetic labels are used, never real ones.
    The network (`models.SmallGazeNet`, `gaze.fit_gaze`, FEATURE_NET_EPOCHS epochs on the first
    FEATURE_NET_ROWS labeled rows, seeded) is trained once per run: ~40 CPU-seconds on one core.
    """

    def __init__(self, images: np.ndarray, gaze: np.ndarray, seed: int = 0):
        recipe = EvaluateConfig(gaze_model="small", gaze_epochs=FEATURE_NET_EPOCHS, gaze_batch_size=64,
                                gaze_val_fraction=0.0, gaze_patience=0)
        with torch.random.fork_rng():  # the caller's RNG streams (a training run's) stay as they were
            self.model, _ = fit_gaze(images, gaze, recipe, seed=seed, progress=False)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            images = to_storage(images)
        return torch.from_numpy(run_model(self.model, images, embed=True))


class RealismReference:
    """A reference image set (held-out real images) prepared once, to score many candidate sets against.

    Unbiased MMD² with a mixture of RBF kernels in a feature space (`GazeFeatures` for eyes
    in training and Tune, else the fixed random `realism_features`), with features
    standardised by the reference's statistics, so scores of different sets
    against one reference share one scale. The reference's features and its kernel term
    are computed once (training scores the same held-out set at every evaluation).
    """

    @torch.no_grad()
    def __init__(self, images: np.ndarray | torch.Tensor, seed: int = 0,
                 features: Callable[[np.ndarray | torch.Tensor], torch.Tensor] | None = None):
        if len(images) < 2:
            raise ValueError("realism_score needs at least two images in each set")
        self.features_of = features or functools.partial(realism_features, seed=seed)
        fb = self.features_of(images).double()
        self.mean, std = fb.mean(0), fb.std(0)
        # A feature that is nearly constant in the reference must not dominate the distance.
        self.std = std.clamp_min(0.1 * float(std.median()) + 1e-8)
        self.features = (fb - self.mean) / self.std
        self.self_term = self._off_diagonal_mean(self._kernel(self.features, self.features))

    def _kernel(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(u, v).square()
        dim = u.shape[1]
        return sum(torch.exp(-d2 / (2 * s * dim)) for s in REALISM_BANDWIDTHS) / len(REALISM_BANDWIDTHS)

    @staticmethod
    def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    @torch.no_grad()
    def score(self, images: np.ndarray | torch.Tensor) -> float:
        if len(images) < 2:
            raise ValueError("realism_score needs at least two images in each set")
        fa = (self.features_of(images).double() - self.mean) / self.std
        mmd2 = self._off_diagonal_mean(self._kernel(fa, fa)) + self.self_term \
            - 2 * self._kernel(fa, self.features).mean()
        return float(mmd2)


def realism_score(images_a: np.ndarray | torch.Tensor, images_b: np.ndarray | torch.Tensor,
                  seed: int = 0, features: Callable[[np.ndarray | torch.Tensor], torch.Tensor] | None = None) -> float:
    """Kernel distance between two image sets; lower = more alike, ~0 for the same distribution.

    `images_b` is the reference (held-out real images); see `RealismReference`. The
    unbiased estimate can dip slightly below 0 when the sets are indistinguishable.
    Accepts storage-form integer arrays or model-form float tensors (from training),
    on any device; no Ray.
    """
    return RealismReference(images_b, seed, features).score(images_a)


# ---------------------------------------------------------------------------------------------
# The combined objective


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


def combine(realism: float, realism_synthetic: float, drift: float, image_width: int) -> float:
    """The objective (lower = better): realism relative to raw synthetic, plus drift beyond the tolerance."""
    tolerance = drift_tolerance_px(image_width)
    return realism / max(realism_synthetic, REALISM_FLOOR) + max(0.0, drift - tolerance) / tolerance


def label_free_scores(synthetic: np.ndarray, refined: np.ndarray, real_val: np.ndarray | RealismReference, *,
                      pupil_xy: np.ndarray | None = None, kind: str = "eye", seed: int = 0,
                      realism_synthetic: float | None = None) -> dict[str, float]:
    """Scores of refined images (N×H×W×C integers, aligned with `synthetic`) against held-out real images.

    Returns `realism` (refined vs real_val), `realism_synthetic` (synthetic vs real_val, the
    baseline; pass it to skip recomputing it), `drift` (px) and `objective` (lower = better).
    `real_val` may be a prepared `RealismReference` (scoring many refiners against one set).
    """
    reference = real_val if isinstance(real_val, RealismReference) else RealismReference(real_val, seed)
    realism = reference.score(refined)
    if realism_synthetic is None:
        realism_synthetic = reference.score(synthetic)
    drift = label_drift(synthetic, refined, kind=kind, pupil_xy=pupil_xy)
    return {"realism": realism, "realism_synthetic": realism_synthetic, "drift": drift,
            "objective": combine(realism, realism_synthetic, drift, synthetic.shape[2])}


class Evaluator:
    """The periodic evaluation of a training run: a fixed synthetic subset, refined and scored.

    Built once per run from `data.synthetic` (its first `train.eval_samples` rows; for eyes
    with gaze labels also the realism space, `GazeFeatures`, from its first FEATURE_NET_ROWS
    rows) and the held-out real images; never reads `data.real_test`. Hand depth maps are
    scored in the random `realism_features` space: no joint-label network is validated yet.
    Calling it with the refiner costs one forward pass over the subset plus the scores
    (timed in `eval_s`).
    """

    def __init__(self, synthetic: np.ndarray, real_val: np.ndarray, *, kind: str = "eye",
                 pupil_xy: np.ndarray | None = None, seed: int = 0, batch_size: int = 256,
                 features: Callable[[np.ndarray | torch.Tensor], torch.Tensor] | None = None):
        if len(synthetic) < 2 or len(real_val) < 2:
            raise UserError(f"the periodic evaluation needs at least 2 synthetic and 2 held-out real images, "
                            f"got {len(synthetic)} and {len(real_val)}")
        self.synthetic, self.reference = synthetic, RealismReference(real_val, seed, features)
        self.kind, self.seed, self.batch_size = kind, seed, batch_size
        self.anchors = pupil_xy if kind != "eye" or pupil_xy is not None else detect_pupil(synthetic)
        self.realism_synthetic = self.reference.score(synthetic)

    @classmethod
    def from_config(cls, cfg: Config) -> Evaluator:
        if not cfg.data.synthetic:
            raise UserError("train.eval_every > 0 needs data.synthetic (its first train.eval_samples rows are "
                            "refined and scored)")
        from simgan_dist.data.schema import load_numpy, read_manifest

        labeled = cfg.model.architecture == "eye" and "gaze" in read_manifest(cfg.data.synthetic,
                                                                               cfg.storage).label_fields
        rows = load_numpy(cfg.data.synthetic, cfg.storage, columns=["image", "gaze"] if labeled else ["image"],
                          limit=max(cfg.train.eval_samples, FEATURE_NET_ROWS if labeled else 0))
        features = GazeFeatures(rows["image"], rows["gaze"], cfg.train.seed) if labeled else None
        real_val = load_real_val(cfg, cfg.train.eval_samples)
        return cls(rows["image"][:cfg.train.eval_samples], real_val, kind=cfg.model.architecture,
                   seed=cfg.train.seed, features=features)

    @torch.no_grad()
    def __call__(self, refine: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Scores of `refine` (model form in → model form out, e.g. the bare refiner module)."""
        start = time.perf_counter()
        out = []
        for lo in range(0, len(self.synthetic), self.batch_size):
            # depth comes back to millimetres around each image's own hand centre
            x, centres = normalize(self.synthetic[lo:lo + self.batch_size], device=device, dtype=dtype)
            out.append(to_storage(refine(x), self.synthetic.dtype, centres))  # the device→host copy (to_host)
        refined = np.concatenate(out)
        scores = label_free_scores(self.synthetic, refined, self.reference, kind=self.kind, seed=self.seed,
                                   pupil_xy=self.anchors, realism_synthetic=self.realism_synthetic)
        return {**scores, "eval_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# Scored checkpoints

SCORES_FILE = "scores.json"  # beside a checkpoint's weights: the step and its scores
SCORE_KEYS = ("objective", "realism", "realism_synthetic", "drift")
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"  # a sweep's output: the winning checkpoint's URI


def write_scores(folder: str | Path, step: int, metrics: dict[str, Any]) -> None:
    scores = {"step": int(step), **{k: float(metrics[k]) for k in SCORE_KEYS}}
    (Path(folder) / SCORES_FILE).write_text(json.dumps(scores) + "\n")


def score_text(metrics: dict[str, Any]) -> str:
    """' | objective … (realism …, drift … px, eval … s)', the end of a progress line (monitor.progress_line's
    style); '' without an evaluation."""
    if "realism" not in metrics:  # no evaluation at this report (a checkpoint may still carry objective=NaN)
        return ""
    return (f" | objective {metrics['objective']:.4g} (realism {metrics['realism']:.4g}, "
            f"drift {metrics['drift']:.3g} px, eval {metrics['eval_s']:.2f} s)")


def best_checkpoint(run: str, storage_cfg: StorageConfig | None = None) -> tuple[str, dict[str, Any]] | None:
    """The scored checkpoint with the lowest objective under a run folder (or a sweep's output).

    Looks at `checkpoint_*/` (Ray Train runs), `checkpoint/` and `best/*/` (`train --local`),
    or a sweep's `best_checkpoint.txt`. None when nothing there carries scores.
    """
    from pyarrow import fs as pafs

    from simgan_dist.data import storage

    filesystem, base = storage.resolve(run, storage_cfg)
    pointer = storage.join(run, BEST_CHECKPOINT_FILE)
    if storage.file_info(filesystem, f"{base}/{BEST_CHECKPOINT_FILE}", pointer).type == pafs.FileType.File:
        uri = storage.read_bytes(pointer, storage_cfg).decode().strip()
        return uri, {"source": pointer}
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    found = []
    for info in infos:
        relative = info.path[len(base):].strip("/").split("/")
        if info.base_name == SCORES_FILE and len(relative) in (2, 3) and relative[0] != "monitor":
            folder = storage.join(run, *relative[:-1])
            scores = json.loads(storage.read_bytes(storage.join(folder, SCORES_FILE), storage_cfg))
            found.append((scores["objective"], scores["step"], folder, scores))
    if not found:
        return None
    _, _, folder, scores = min(found, key=lambda f: (f[0], -f[1]))  # ties: the later step
    return folder, scores
