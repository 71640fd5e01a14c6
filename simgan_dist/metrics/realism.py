"""Realism: how alike a set of images and the held-out real images look (no real labels read).

`realism_score` is an unbiased MMD² in a feature space: for eyes the penultimate layer of a
gaze CNN fitted to the synthetic labels (`GazeFeatures`), else fixed random convolutions
(`realism_features`); ~0 = indistinguishable, lower = more real. `RealismReference` prepares
the real side once for many candidates. A new realism metric goes here.

No Ray import: pure numpy/torch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simgan_dist.config import EvaluateConfig
from simgan_dist.core.imaging import to_host, to_model_input, to_storage
from simgan_dist.core.models import SmallGazeNet
from simgan_dist.metrics.estimators import device, fit_estimator, run_model

FEATURE_NET_ROWS = 4096  # labeled synthetic rows the eyes' realism space (GazeFeatures) learns from
FEATURE_NET_EPOCHS = 8
FEATURE_NET_VERSION = 1  # part of the cache key: bump when the network or its recipe changes
REALISM_BANDWIDTHS = (0.25, 1.0, 4.0)  # RBF widths, as multiples of the feature dimension
JACKKNIFE_BLOCKS = 8  # blocks of the candidate set left out in turn for a score's standard error


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
    The network (`models.SmallGazeNet`, `estimators.fit_estimator`, FEATURE_NET_EPOCHS epochs on the first
    FEATURE_NET_ROWS labeled rows, seeded) costs ~40 CPU-seconds on one core, so `cached` fits it
    once per dataset and seed and keeps it on the node (`feature_cache_dir`).
    """

    def __init__(self, images: np.ndarray, gaze: np.ndarray, seed: int = 0):
        recipe = EvaluateConfig(gaze_model="small", gaze_epochs=FEATURE_NET_EPOCHS, gaze_batch_size=64,
                                gaze_val_fraction=0.0, gaze_patience=0)
        with torch.random.fork_rng():  # the caller's RNG streams (a training run's) stay as they were
            self.model, _ = fit_estimator(images, gaze, recipe, seed=seed, progress=False)

    @classmethod
    def cached(cls, dataset_key: str, images: np.ndarray, gaze: np.ndarray, seed: int = 0) -> GazeFeatures:
        """The space for these rows of the dataset whose manifest hashes to `dataset_key`: fitted once,
        then read back (as data only) by every later run, trial or evaluation on this node."""
        from simgan_dist.train.checkpoint import load_data

        shape = "x".join(map(str, images.shape[1:]))
        name = hashlib.sha256(f"{FEATURE_NET_VERSION}/{dataset_key}/{len(images)}/{shape}/{seed}".encode()).hexdigest()
        path = feature_cache_dir() / f"gaze_features_{name[:32]}.pt"
        if path.is_file():
            space = cls.__new__(cls)
            height, width, channels = images.shape[1:]
            space.model = SmallGazeNet(channels, height, width)
            space.model.load_state_dict(load_data(path, str(path)))
            space.model.to(device()).eval()
            return space
        space = cls(images, gaze, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent trials: each its own, then rename
        torch.save(space.model.state_dict(), tmp)  # read back onto the CPU (load_data), then moved
        os.replace(tmp, path)
        return space

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            images = to_storage(images)
        return torch.from_numpy(run_model(self.model, images, embed=True))


def feature_cache_dir() -> Path:
    """Where fitted realism networks are kept: $SIMGAN_DIST_CACHE, else ~/.cache/simgan_dist."""
    return Path(os.environ.get("SIMGAN_DIST_CACHE") or Path.home() / ".cache" / "simgan_dist") / "realism"


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

    def score(self, images: np.ndarray | torch.Tensor) -> float:
        return self.score_and_error(images)[0]

    @torch.no_grad()
    def score_and_error(self, images: np.ndarray | torch.Tensor) -> tuple[float, float]:
        """The score of `images` and its standard error over them: a delete-a-block jackknife
        (JACKKNIFE_BLOCKS blocks) with the reference held fixed, as it is for every set it ranks."""
        if len(images) < 2:
            raise ValueError("realism_score needs at least two images in each set")
        fa = (self.features_of(images).double() - self.mean) / self.std
        within, across = self._kernel(fa, fa), self._kernel(fa, self.features).mean(1)

        def mmd2(rows: torch.Tensor) -> torch.Tensor:
            return self._off_diagonal_mean(within[rows][:, rows]) + self.self_term - 2 * across[rows].mean()

        count = len(fa)
        blocks = min(JACKKNIFE_BLOCKS, count // 2)
        everyone = torch.arange(count, device=fa.device)
        parts = everyone.tensor_split(blocks)
        estimates = to_host(torch.stack([mmd2(everyone), *(mmd2(torch.cat(parts[:b] + parts[b + 1:]))
                                                            for b in range(blocks))]))  # one device→host copy
        leave_out = estimates[1:]
        error = math.sqrt((blocks - 1) / blocks * float(((leave_out - leave_out.mean()) ** 2).sum()))
        return float(estimates[0]), error


def realism_score(images_a: np.ndarray | torch.Tensor, images_b: np.ndarray | torch.Tensor,
                  seed: int = 0, features: Callable[[np.ndarray | torch.Tensor], torch.Tensor] | None = None) -> float:
    """Kernel distance between two image sets; lower = more alike, ~0 for the same distribution.

    `images_b` is the reference (held-out real images); see `RealismReference`. The
    unbiased estimate can dip slightly below 0 when the sets are indistinguishable.
    Accepts storage-form integer arrays or model-form float tensors (from training),
    on any device; no Ray.
    """
    return RealismReference(images_b, seed, features).score(images_a)
