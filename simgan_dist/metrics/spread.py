"""The sweep's judge of trials (eyes): how widely a gaze estimator trained on a refiner's output scatters on real eyes.

Train a small gaze estimator on refined synthetic eyes with their synthetic labels, predict the
held-out real eyes (unlabeled) and measure how far its predictions scatter: the RMS angle of the
predicted gaze directions from their mean direction. The real eyes' own gazes are the same for every
candidate, and an estimator's errors on them add scatter on top, so the candidate whose estimator
scatters least is the one whose estimator errs least. Only synthetic labels are read, never real
ones. The ratio to the same estimator's scatter on its own training images guards the one way to
scatter little without being right: an estimator that could not learn from the refined images
predicts nearly the same gaze everywhere, on real eyes and on its training eyes alike.

It ranks refiners like the downstream gaze error where the realism term does not (bench/RESULTS.md,
issue 23 6b.), but costs one estimator fit (~10 CPU-seconds, well under one on a GPU): the sweep
scores each trial's chosen checkpoint once, not every evaluation. Pure numpy/torch, no Ray.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from simgan_dist.config import EvaluateConfig
from simgan_dist.metrics.estimators import GAZE, angular_error_deg, fit_estimator, predict

SPREAD_ROWS = 2048  # refined rows the estimator learns from
SPREAD_BATCH = 64
# 8 epochs of SPREAD_ROWS (fewer left some estimators predicting one gaze for every eye); a smaller corpus
# gets more epochs, the same number of steps
SPREAD_STEPS = 8 * SPREAD_ROWS // SPREAD_BATCH
UNDERFIT = 0.5  # an estimator scattering less than this share of its labels' scatter on its own eyes did not learn


def angular_spread_deg(gaze: np.ndarray) -> float:
    """RMS angle (degrees) of N 3-D gaze vectors from their mean direction."""
    gaze = np.asarray(gaze, dtype=np.float64)
    gaze = gaze / np.maximum(np.linalg.norm(gaze, axis=1, keepdims=True), 1e-12)
    return float(np.sqrt((angular_error_deg(gaze, np.broadcast_to(gaze.mean(0), gaze.shape)) ** 2).mean()))


def refined_spread(refined: np.ndarray, gaze: np.ndarray, real_val: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The judge's scores of refined eyes (N×H×W×C integers) with their synthetic gaze labels.

    Returns `spread` (the estimator's scatter on `real_val`, degrees), `fit_spread` (its scatter on
    its training images), `spread_ratio` (their ratio, lower = better: the judge), `label_spread`
    (the training labels' scatter), `underfit` (1.0 when the estimator scattered less than UNDERFIT of
    the labels' on its own eyes: it did not learn, and its ratio says little) and `spread_s`.
    """
    if len(refined) < 2 or len(real_val) < 2:
        raise ValueError(f"the spread judge needs at least 2 refined and 2 real images, got {len(refined)} "
                         f"and {len(real_val)}")
    start = time.perf_counter()
    images, labels = refined[:SPREAD_ROWS], np.asarray(gaze[:SPREAD_ROWS], dtype=np.float32)
    batch = min(SPREAD_BATCH, len(images))
    recipe = EvaluateConfig(gaze_model="small", gaze_epochs=-(-SPREAD_STEPS // (len(images) // batch)),
                            gaze_batch_size=batch, gaze_val_fraction=0.0, gaze_patience=0)
    with torch.random.fork_rng():  # a caller's RNG streams stay as they were
        model, _ = fit_estimator(images, labels, recipe, seed=seed, progress=False)
    spread = angular_spread_deg(predict(model, real_val, GAZE))
    fit_spread = angular_spread_deg(predict(model, images, GAZE))
    label_spread = angular_spread_deg(labels)
    return {"spread": spread, "fit_spread": fit_spread, "spread_ratio": spread / max(fit_spread, 1e-6),
            "label_spread": label_spread, "underfit": float(fit_spread < UNDERFIT * label_spread),
            "spread_s": time.perf_counter() - start}
