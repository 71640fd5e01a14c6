"""The label-free objective: realism (`realism.py`) and label drift (`drift.py`) in one score.

Training (every `train.eval_every` steps), Tune (the sweep's metric), checkpoint selection
(`refine --checkpoint RUN_DIR`) and the evaluation report all use this module, so a score
means the same thing everywhere. Nothing here reads `real_test`: the reference real images
are a held-out validation part of the unlabeled real corpus (`data.real_val`, or the rows of
`data.real` picked by `data.real_val_fraction` from a hash of their id, which the training
stream then skips).

    realism = unbiased MMD² between refined and held-out real images in the feature space of a
              gaze CNN fitted to the synthetic labels (`GazeFeatures`; depth maps: a fixed
              random-conv space) (`realism.realism_score`; ~0 = indistinguishable, lower = more real)
    drift   = mean label displacement, px: the pupil centre for eyes (`drift.pupil_shift`), the
              hand silhouette's centroid for depth maps (`drift.silhouette_shift`)
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

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simgan_dist.config import Config, StorageConfig
from simgan_dist.core.imaging import refine_images
from simgan_dist.data.splits import load_real_val
from simgan_dist.errors import UserError
from simgan_dist.metrics.drift import detect_pupil, drift_tolerance_px, label_drift
from simgan_dist.metrics.realism import FEATURE_NET_ROWS, GazeFeatures, RealismReference

REALISM_FLOOR = 1e-3  # a synthetic corpus already this close to real leaves no realism to win


def combine(realism: float, realism_synthetic: float, drift: float, image_width: int,
            tolerance_px: float | None = None) -> float:
    """The objective (lower = better): realism relative to raw synthetic, plus drift beyond the tolerance
    (`drift_tolerance_px` for the width unless given: bench/checkpoint_choice.py compares tolerances)."""
    tolerance = tolerance_px or drift_tolerance_px(image_width)
    return realism / max(realism_synthetic, REALISM_FLOOR) + max(0.0, drift - tolerance) / tolerance


def label_free_scores(synthetic: np.ndarray, refined: np.ndarray, real_val: np.ndarray | RealismReference, *,
                      pupil_xy: np.ndarray | None = None, kind: str = "eye", seed: int = 0,
                      realism_synthetic: float | None = None) -> dict[str, float]:
    """Scores of refined images (N×H×W×C integers, aligned with `synthetic`) against held-out real images.

    Returns `realism` (refined vs real_val) and its standard error over the refined images
    `realism_se`, `realism_synthetic` (synthetic vs real_val, the baseline; pass it to skip
    recomputing it), `drift` (px), `objective` (lower = better) and `objective_se`, the
    realism term's share of the error (the one that ranks checkpoints within the tolerance).
    `real_val` may be a prepared `RealismReference` (scoring many refiners against one set).
    """
    reference = real_val if isinstance(real_val, RealismReference) else RealismReference(real_val, seed)
    realism, realism_se = reference.score_and_error(refined)
    if realism_synthetic is None:
        realism_synthetic = reference.score(synthetic)
    drift = label_drift(synthetic, refined, kind=kind, pupil_xy=pupil_xy)
    return {"realism": realism, "realism_se": realism_se, "realism_synthetic": realism_synthetic, "drift": drift,
            "objective": combine(realism, realism_synthetic, drift, synthetic.shape[2]),
            "objective_se": realism_se / max(realism_synthetic, REALISM_FLOOR)}


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
        from simgan_dist.data.schema import Manifest, load_numpy, read_manifest_bytes

        name, manifest = read_manifest_bytes(cfg.data.synthetic, cfg.storage)
        labeled = cfg.model.architecture == "eye" and "gaze" in Manifest.from_json(
            manifest.decode(errors="replace"), cfg.data.synthetic, name).label_fields
        rows = load_numpy(cfg.data.synthetic, cfg.storage, columns=["image", "gaze"] if labeled else ["image"],
                          limit=max(cfg.train.eval_samples, FEATURE_NET_ROWS if labeled else 0))
        # Every trial of a sweep on this corpus scores in the same space, fitted once (a manifest names
        # each shard's sha256: the same bytes, the same rows).
        features = GazeFeatures.cached(hashlib.sha256(manifest).hexdigest(), rows["image"][:FEATURE_NET_ROWS],
                                       rows["gaze"][:FEATURE_NET_ROWS], cfg.train.seed) if labeled else None
        real_val = load_real_val(cfg, cfg.train.eval_samples)
        return cls(rows["image"][:cfg.train.eval_samples], real_val, kind=cfg.model.architecture,
                   seed=cfg.train.seed, features=features)

    @torch.no_grad()
    def __call__(self, refine: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Scores of `refine` (model form in → model form out, e.g. the bare refiner module)."""
        start = time.perf_counter()
        refined = refine_images(refine, self.synthetic, self.batch_size, device, dtype)  # to_host's device→host copy
        scores = label_free_scores(self.synthetic, refined, self.reference, kind=self.kind, seed=self.seed,
                                   pupil_xy=self.anchors, realism_synthetic=self.realism_synthetic)
        return {**scores, "eval_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# Scored checkpoints

SCORES_FILE = "scores.json"  # beside a checkpoint's weights: the step and its scores
SCORE_KEYS = ("objective", "objective_se", "realism", "realism_synthetic", "drift")
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"  # a sweep's output: the winning checkpoint's URI


def write_scores(folder: str | Path, step: int, metrics: dict[str, Any]) -> None:
    scores = {"step": int(step), **{k: float(metrics[k]) for k in SCORE_KEYS}}
    (Path(folder) / SCORES_FILE).write_text(json.dumps(scores) + "\n")


def score_text(metrics: dict[str, Any]) -> str:
    """' | objective … (realism …, drift … px, eval … s)', the end of a progress line (monitor.progress_line's
    style); '' without an evaluation."""
    if "realism" not in metrics:  # no evaluation at this report (a checkpoint may still carry objective=NaN)
        return ""
    return (f" | objective {metrics['objective']:.4g} ± {metrics['objective_se']:.2g} "
            f"(realism {metrics['realism']:.4g}, "
            f"drift {metrics['drift']:.3g} px, eval {metrics['eval_s']:.2f} s)")


def choose(found: list[tuple[float, int, Any]], errors: list[float]) -> int:
    """Which of the scored checkpoints (objective, step, …) to refine with: the latest one whose
    objective is within one standard error (`errors`, the objective_se of each) of the lowest.

    The lowest objective alone is a noisy pick: neighbouring checkpoints differ by about one
    standard error, so it was usually an early checkpoint that scored low by chance, while the
    downstream gain grows with training (bench/RESULTS.md, issue 23: regret over 5 training seeds).
    Returns the index into `found`."""
    lowest = min(range(len(found)), key=lambda i: (found[i][0], -found[i][1]))
    bound = found[lowest][0] + errors[lowest]
    return max((i for i in range(len(found)) if found[i][0] <= bound), key=lambda i: found[i][1])


def best_checkpoint(run: str, storage_cfg: StorageConfig | None = None) -> tuple[str, dict[str, Any]] | None:
    """The scored checkpoint to refine with under a run folder (`choose`), or a sweep's winner.

    Looks at `checkpoint_*/` (Ray Train runs), `checkpoint/` and `best/*/` (`train --local`),
    or a sweep's `best_checkpoint.txt`. None when nothing there carries scores. Scores written
    before objective_se existed count as exact (the lowest objective is chosen).
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
    _, _, folder, scores = found[choose(found, [f[3].get("objective_se", 0.0) for f in found])]
    return folder, scores
