"""Does the refined corpus help? The paper's checks, on any datasets in the contract.

1. Downstream estimation: eyes (paper §3.1.3): the paper's GazeNet (or a small CPU CNN);
   hand depth maps (paper §3.2): a small joint regressor (`models.SmallPoseNet`, the 16
   joints' image positions). Each is trained on raw synthetic, on refined and, where labeled
   real training data exists, on real images (the ceiling), and tested on labeled real_test
   images. Same seed, schedule and data order for every variant, no augmentation, so the
   training images are the only difference. The variants run as parallel Ray tasks (or
   in-process).
2. Label preservation: how far the refiner moved the pupil, in pixels (the paper:
   1.1 ± 0.8 px on a 55 px eye; `drift.pupil_shift`), or the hand's silhouette centroid
   (`drift.silhouette_shift`).
3. Realism: a kernel distance between refined and held-out real images, in the feature
   space of a gaze CNN fitted to the synthetic labels for eyes (`realism.GazeFeatures`), of
   fixed random convolutions for depth (`realism.realism_features`); shared with training
   and Tune; no real labels.
4. Artifacts (eyes): a frame along the border and ripples, refined vs real vs synthetic
   (`artifacts.artifact_metrics`: border ring profiles and the radial power spectrum).

Outputs: `OUT/metrics.json` for machines and `OUT/report.html` (with PNGs) for people.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from simgan_dist import report
from simgan_dist.config import Config, EvaluateConfig, load_config
from simgan_dist.evaluate_inputs import EvaluationError, load_inputs
from simgan_dist.metrics.artifacts import artifact_metrics
from simgan_dist.metrics.estimators import (
    GAZE,
    TASKS,
    Task,
    angular_error_deg,
    fit_estimator,
    joint_distances_px,
    predict,
)
from simgan_dist.metrics.preservation import label_preservation, silhouette_preservation
from simgan_dist.metrics.realism import FEATURE_NET_ROWS, GazeFeatures, realism_score

WITHIN_DEG = 7.0  # the paper's threshold for "correct" gaze
# Hands: the fraction of joints within d px, d = 0..20 (the paper's curve), in the image's own pixels.
WITHIN_PX = 5.0
CURVE_PX = tuple(range(21))
# Each task's test statistics: (mean, median, within-threshold) keys of a result.
SUMMARY_KEYS = {"gaze": ("mean_deg", "median_deg", "within_7deg"), "joints_uvd": ("mean_px", "median_px", "within_5px")}
METRICS_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Gaze metric


def gaze_summary(errors_deg: np.ndarray) -> dict[str, float]:
    errors_deg = np.asarray(errors_deg, dtype=np.float64)
    return {
        "mean_deg": float(errors_deg.mean()),
        "median_deg": float(np.median(errors_deg)),
        "within_7deg": float((errors_deg <= WITHIN_DEG).mean()),
    }


def pose_summary(distances_px: np.ndarray) -> dict[str, Any]:
    """Joint errors (N×J px): the mean over joints and images, the median, and the within-d curve."""
    distances_px = np.asarray(distances_px, dtype=np.float64)
    return {
        "mean_px": float(distances_px.mean()),
        "median_px": float(np.median(distances_px)),
        "within_5px": float((distances_px <= WITHIN_PX).mean()),
        "within_px_curve": [float((distances_px <= d).mean()) for d in CURVE_PX],
    }


# ---------------------------------------------------------------------------------------------
# Downstream estimation


def train_estimator(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                    test_labels: np.ndarray, cfg: EvaluateConfig, *, task: Task = GAZE, name: str = "gaze",
                    seed: int = 0, threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train an estimator to convergence on one training set (`estimators.fit_estimator`) and test it on real_test.

    real_test is touched once, at the end: it never chooses anything. Returns the test
    summary, the per-image test errors (gaze: degrees; hand pose: N×J joint distances in px),
    the per-epoch training loss and validation error, and the epoch kept.
    """
    model, info = fit_estimator(train_images, train_labels, cfg, task=task, name=name, seed=seed, threads=threads,
                                progress=progress)
    pred = predict(model, test_images, task)
    if task.label == GAZE.label:
        errors = angular_error_deg(pred, test_labels)
        summary = gaze_summary(errors)
    else:
        errors = joint_distances_px(pred, test_labels)
        summary = pose_summary(errors)
    return {**summary, **info, "test_rows": int(len(test_images)), "errors": errors.astype(np.float32)}


def run_variants(variants: dict[str, tuple[np.ndarray, np.ndarray]], test_images: np.ndarray,
                 test_labels: np.ndarray, cfg: EvaluateConfig, *, task: Task = GAZE, seeds: list[int] | None = None,
                 use_ray: bool = True, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Train one estimator per variant {name: (images, labels)} and seed; test each on real_test.

    Returns {name: [one `train_estimator` result per seed]}; seed s means the same init, data
    order and validation ids in every variant (`cfg.seeds` unless given). With Ray: one
    task per (variant, seed), a whole GPU each when the cluster has GPUs; on CPUs each
    task gets an even share of the cores (at least one) and torch is pinned to it, so
    tasks queue instead of thrashing. Without Ray: one after the other in this process.
    """
    seeds = list(cfg.seeds if seeds is None else seeds)
    jobs = [(name, s) for name in variants for s in seeds]
    if not use_ray:
        results = {job: train_estimator(*variants[job[0]], test_images, test_labels, cfg, task=task, name=job[0],
                                        seed=job[1], progress=progress) for job in jobs}
    else:
        import ray

        from simgan_dist.ray_cluster import connect, estimator_task_options

        connect()  # the job's cluster under `ray job submit`, a registered one, or a local instance
        options, threads = estimator_task_options(len(jobs))
        remote = ray.remote(train_estimator).options(**options, max_retries=1)
        test_ref, test_labels_ref = ray.put(test_images), ray.put(test_labels)
        data_refs = {name: (ray.put(x), ray.put(y)) for name, (x, y) in variants.items()}
        refs = [remote.remote(*data_refs[name], test_ref, test_labels_ref, cfg, task=task, name=name, seed=s,
                              threads=threads, progress=progress) for name, s in jobs]
        results = dict(zip(jobs, ray.get(refs), strict=True))
    return {name: [results[(name, s)] for s in seeds] for name in variants}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value) over seeds."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _keys(runs: list[dict[str, Any]]) -> tuple[str, str, str]:
    return SUMMARY_KEYS["gaze" if "mean_deg" in runs[0] else "joints_uvd"]


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over seeds: mean ± std of each test statistic (and of the within-d curve), the per-seed results."""
    summary: dict[str, Any] = {}
    for key in _keys(runs):
        summary[key], summary[f"{key}_std"] = _mean_std([r[key] for r in runs])
    if "within_px_curve" in runs[0]:
        summary["within_px_curve"] = np.mean([r["within_px_curve"] for r in runs], axis=0).tolist()
    per_seed = [{k: v for k, v in r.items() if k != "errors"} for r in runs]
    return {**summary, "model": runs[0]["model"], "seeds": [r["seed"] for r in runs],
            "train_rows": runs[0]["train_rows"], "val_rows": runs[0]["val_rows"], "test_rows": runs[0]["test_rows"],
            "seconds": round(sum(r["seconds"] for r in runs), 1), "loss_curve": runs[0]["loss_curve"],
            "per_seed": per_seed}


def paired_improvement(baseline: list[dict[str, Any]], treated: list[dict[str, Any]]) -> dict[str, Any]:
    """Relative error reduction of `treated` over `baseline`, seed by seed (positive = treated better), and the
    gain in the share within the task's threshold (7°, or 5 px per joint)."""
    mean_key, _, within_key = _keys(baseline)
    pairs = list(zip(baseline, treated, strict=True))
    per_seed = [(b[mean_key] - t[mean_key]) / b[mean_key] for b, t in pairs]
    mean, std = _mean_std(per_seed)
    gain, gain_std = _mean_std([t[within_key] - b[within_key] for b, t in pairs])
    return {"mean": mean, "std": std, "per_seed": per_seed, "seeds": [b["seed"] for b in baseline],
            f"{within_key}_gain": gain, f"{within_key}_gain_std": gain_std}


# ---------------------------------------------------------------------------------------------
# The evaluation


def read_run_metrics(run: str | Path | None) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records (a resumed run's repeated steps: the last record wins).

    `run` is a `train --local` folder or a Ray run folder (`<storage_path>/<name>`, whose
    records live in `monitor/`).
    """
    if not run:
        return []
    candidates = [Path(run) / "metrics.jsonl", Path(run) / "monitor" / "metrics.jsonl"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise EvaluationError(f"--run {run}: no metrics.jsonl there or in its monitor/ (give the training run folder)")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _log(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


def evaluate(synthetic: str, refined: str, real_test: str, out: str | Path, *, real: str | None = None,
             run: str | Path | None = None, cfg: Config | None = None, use_ray: bool = True,
             seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run all three experiments, write `out/metrics.json` and `out/report.html`; return the metrics."""
    from simgan_dist.data import storage

    cfg = cfg or load_config("eye")
    out = Path(out)
    if "://" in str(out):
        raise EvaluationError(f"--out {out}: the report goes to a local folder")
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out}: is a file; the report goes to a folder")
    for what, uri in (("synthetic", synthetic), ("refined", refined), ("real-test", real_test), ("real", real)):
        # Report files inside a dataset would be read as its rows by plain Parquet readers.
        if uri and not storage.is_s3(uri) and storage.is_within(str(out), uri):
            raise EvaluationError(f"--out {out}: is inside the --{what} dataset {uri}; choose a folder outside it")
    curves = read_run_metrics(run)
    start = time.perf_counter()
    data = load_inputs(synthetic, refined, real_test, real, cfg)
    _log(f"loaded {len(data.ids):,} of {data.corpus_pairs:,} synthetic/refined pairs, {len(data.real_test):,} "
         "real_test images" + (f", {len(data.real):,} of {data.corpus_real:,} labeled real images"
                               if data.real is not None else ""))
    for note in data.notes:
        _log(note)

    task = TASKS[data.kind]
    eye = data.kind == "eye"
    if eye:
        _log("label preservation: pupil shift")
        preservation, shifts = label_preservation(data.synthetic, data.refined, data.pupil_xy, data.real_test,
                                                  data.real_test_pupil_xy)
    else:
        _log("label preservation: hand silhouette shift and depth at the joints")
        preservation, shifts = silhouette_preservation(data.synthetic, data.refined, data.labels)

    _log("realism: kernel distance to held-out real_test images")
    rng = np.random.default_rng(seed)
    n_a = min(cfg.evaluate.realism_samples, len(data.ids))
    n_b = min(cfg.evaluate.realism_samples, len(data.real_test))
    pick = np.sort(rng.choice(len(data.ids), n_a, replace=False))  # the same pairs for both scores
    reference = data.real_test[np.sort(rng.choice(len(data.real_test), n_b, replace=False))]
    # the space training and Tune score in: a gaze CNN fitted to the synthetic labels (eyes), fixed
    # random convolutions (depth)
    features = GazeFeatures(data.synthetic[:FEATURE_NET_ROWS], data.labels[:FEATURE_NET_ROWS], seed) if eye else None
    realism = {
        "feature_space": (f"penultimate layer of a small gaze CNN trained on the first {FEATURE_NET_ROWS:,} synthetic "
                          "images' gaze labels (realism.GazeFeatures, seeded)" if eye else
                          "three fixed random 3x3 conv layers, pooled (realism.realism_features, seeded)"),
        "distance": "unbiased MMD², mixture of RBF kernels, features standardised by the real set",
        "reference": "real_test images (held out: the refiner never saw them)",
        "samples": [int(n_a), int(n_b)], "seed": seed,
        "refined_vs_real": realism_score(data.refined[pick], reference, seed, features),
        "synthetic_vs_real": realism_score(data.synthetic[pick], reference, seed, features),
    }
    artifacts = None
    if eye:  # gray-level rings and spectra; depth maps' borders are their wall
        _log("artifacts: border frame and power spectrum, refined vs real_test")
        artifacts = artifact_metrics({"synthetic": data.synthetic[pick], "refined": data.refined[pick],
                                      "real": reference})

    variants = {"synthetic": (data.synthetic, data.labels), "refined": (data.refined, data.labels)}
    if data.real is not None:
        variants["real"] = (data.real, data.real_labels)
    ev = cfg.evaluate
    model = ev.gaze_model if eye else "small-pose"
    _log(f"downstream {task.name}: training {len(variants)} x {len(ev.seeds)} {model} estimators "
         f"({', '.join(variants)}; seeds {ev.seeds}; at most {ev.gaze_epochs} epochs, best on a held-out "
         f"{ev.gaze_val_fraction:.0%} of each training set)" + (" as Ray tasks" if use_ray else " in this process"))
    runs = run_variants(variants, data.real_test, data.real_test_labels, ev, task=task, use_ray=use_ray,
                        progress=progress)
    # Per-image (per-joint) errors pooled over seeds, for the error curves.
    errors = {name: np.concatenate([r["errors"].ravel() for r in seed_runs]) for name, seed_runs in runs.items()}
    paired = paired_improvement(runs["synthetic"], runs["refined"])
    _, _, within_key = SUMMARY_KEYS[task.label]
    downstream = {
        "model": model,
        "seeds": list(ev.seeds),
        "rule": (f"each estimator trains for at most {ev.gaze_epochs} epochs; {ev.gaze_val_fraction:.0%} of its own "
                 f"training set (seeded, the same ids in every variant) is held out, training stops after "
                 f"{ev.gaze_patience} epochs without a lower validation error and the best epoch is tested on "
                 "real_test; seed s gives every variant the same init, order and held-out ids"),
        "variants": {name: summarize_runs(seed_runs) for name, seed_runs in runs.items()},
        "relative_improvement": paired["mean"],
        "relative_improvement_std": paired["std"],
        "relative_improvement_per_seed": paired["per_seed"],
        f"{within_key}_gain": paired[f"{within_key}_gain"],
        f"{within_key}_gain_std": paired[f"{within_key}_gain_std"],
    }
    if not eye:
        downstream["curve_px"] = list(CURVE_PX)
        downstream["targets"] = "each joint's (u, v) in the image's own pixels; depth is not estimated"
    diff = data.refined[pick].astype(np.int32) - data.synthetic[pick].astype(np.int32)
    metrics = {
        "version": METRICS_VERSION,
        "kind": data.kind,
        "inputs": {"synthetic": synthetic, "refined": refined, "real_test": real_test, "real": real,
                   "run": str(run) if run else None, "pairs": int(len(data.ids)),
                   "corpus_pairs": data.corpus_pairs, "max_train_rows": cfg.evaluate.max_train_rows,
                   "real_rows": None if data.real is None else int(len(data.real)),
                   "corpus_real_rows": data.corpus_real,
                   "real_test_rows": int(len(data.real_test)), "notes": data.notes},
        "config": {"evaluate": cfg.to_dict()["evaluate"], "seed": seed},
        "gaze" if eye else "hand_pose": downstream,
        "label_preservation": preservation,
        "realism": realism,
        **({"artifacts": artifacts} if eye else {}),
        "refinement": ({"mean_abs_change_gray_levels": float(np.abs(diff).mean())} if eye else
                       # readings on both sides (a refined map stores its wall as 0)
                       {"mean_abs_change_mm": float(np.abs(diff[(data.synthetic[pick] > 0)
                                                                & (data.refined[pick] > 0)]).mean())}),
        "headline": _headline(downstream, preservation, realism, artifacts, eye, len(ev.seeds)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    report_path = report.write_report(out, metrics, data, errors, shifts, curves, seed=seed)
    _print_headline(metrics, report_path)
    return metrics


def _headline(downstream: dict[str, Any], preservation: dict[str, Any], realism: dict[str, Any],
              artifacts: dict[str, Any] | None, eye: bool, seeds: int) -> dict[str, Any]:
    syn, ref = downstream["variants"]["synthetic"], downstream["variants"]["refined"]
    shift = preservation["shift_px"]
    if eye:
        headline = {"gaze_error_synthetic_deg": syn["mean_deg"], "gaze_error_synthetic_deg_std": syn["mean_deg_std"],
                    "gaze_error_refined_deg": ref["mean_deg"], "gaze_error_refined_deg_std": ref["mean_deg_std"]}
    else:
        headline = {"joint_error_synthetic_px": syn["mean_px"], "joint_error_synthetic_px_std": syn["mean_px_std"],
                    "joint_error_refined_px": ref["mean_px"], "joint_error_refined_px_std": ref["mean_px_std"]}
    headline.update({
        "relative_improvement": downstream["relative_improvement"],
        "relative_improvement_std": downstream["relative_improvement_std"],
        "gaze_seeds" if eye else "pose_seeds": seeds,
        "pupil_shift_px" if eye else "silhouette_shift_px": shift["mean"],
        "pupil_shift_px_std" if eye else "silhouette_shift_px_std": shift["std"],
        "realism_refined": realism["refined_vs_real"],
        "realism_synthetic": realism["synthetic_vs_real"],
    })
    if artifacts is not None:
        headline.update({
            "frame_score_refined": artifacts["border"]["refined"]["frame_score"],
            "frame_score_real": artifacts["border"]["real"]["frame_score"],
            "spectrum_distance_refined": artifacts["vs_real"]["refined"]["spectrum_log_distance"],
            "spectrum_distance_synthetic": artifacts["vs_real"]["synthetic"]["spectrum_log_distance"],
        })
    return headline


def _print_headline(metrics: dict[str, Any], report_path: Path) -> None:
    h = metrics["headline"]
    eye = metrics["kind"] == "eye"
    downstream = metrics["gaze" if eye else "hand_pose"]
    unit, what, (mean_key, _, within_key) = ("°", "gaze", SUMMARY_KEYS["gaze"]) if eye else \
        (" px", "joint", SUMMARY_KEYS["joints_uvd"])
    within = "within 7°" if eye else f"of joints within {WITHIN_PX:g} px"
    for name, r in downstream["variants"].items():
        _log(f"{what} estimator trained on {name:9s}: {r[mean_key]:.2f} ± {r[f'{mean_key}_std']:.2f}{unit} mean "
             f"error, {100 * r[within_key]:.1f}% {within} ({len(r['seeds'])} seeds)")
    shift = metrics["label_preservation"]["shift_px"]
    per_seed = ", ".join(f"{100 * g:+.1f}%" for g in downstream["relative_improvement_per_seed"])
    syn, ref = downstream["variants"]["synthetic"][mean_key], downstream["variants"]["refined"][mean_key]
    _log(f"refined vs synthetic: {what} error {syn:.2f}{unit} → {ref:.2f}{unit} "
         f"({report.describe_change(h['relative_improvement'])} ± {100 * h['relative_improvement_std']:.1f}%, "
         f"paired over seeds: {per_seed})")
    _log(f"{'pupil' if eye else 'hand silhouette'} shift: {shift['mean']:.2f} ± {shift['std']:.2f} px; realism "
         f"(lower = more real): refined {h['realism_refined']:.4f} vs synthetic {h['realism_synthetic']:.4f}")
    if eye:
        _log(f"artifacts vs real: frame score refined {h['frame_score_refined']:.2f} (real {h['frame_score_real']:.2f} "
             f"gray levels); spectrum distance refined {h['spectrum_distance_refined']:.3f} vs synthetic "
             f"{h['spectrum_distance_synthetic']:.3f}")
    _log(f"report: {report_path}")


def cli_evaluate(args: argparse.Namespace) -> int:
    from simgan_dist import tracking

    cfg = load_config(args.preset, args.config, args.overrides)
    datasets = {"synthetic": args.synthetic, "refined": args.refined, "real_test": args.real_test, "real": args.real}
    checkpoint = tracking.refined_from(args.refined, cfg.storage) if tracking.tracking_uri(cfg) else None
    with tracking.stage_run(cfg, "evaluate", checkpoint, datasets) as run:
        metrics = evaluate(args.synthetic, args.refined, args.real_test, args.out, real=args.real, run=args.run,
                           cfg=cfg, use_ray=not args.no_ray)
        run.metrics(None, metrics["headline"])
        run.folder(args.out, "report")  # report.html with its figures and metrics.json
    return 0
