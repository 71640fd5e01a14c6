"""Does the refined corpus help? The paper's three checks, on any datasets in the contract.

1. Downstream gaze (paper §3.1.3): the paper's GazeNet is trained on raw synthetic,
   on refined and, where labeled real training data exists, on real images (the
   ceiling); each is tested on labeled real_test images. Same seed, schedule and
   data order for every variant, no augmentation, so the training images are the
   only difference. The variants run as parallel Ray tasks (or in-process).
2. Label preservation: how far the refiner moved the pupil, in pixels (the paper:
   1.1 ± 0.8 px on a 55 px eye). See `drift.pupil_shift`.
3. Realism: a kernel distance between refined and held-out real images in the feature
   space of a gaze CNN fitted to the synthetic labels (`realism.GazeFeatures` and
   `realism.realism_score`, shared with training and Tune; no real labels).
4. Artifacts: a frame along the border and ripples, refined vs real vs synthetic
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
from simgan_dist.metrics.drift import PUPIL_RADIUS, detect_pupil, pupil_shift
from simgan_dist.metrics.gaze import angular_error_deg, fit_gaze, run_model
from simgan_dist.metrics.realism import FEATURE_NET_ROWS, GazeFeatures, realism_score

WITHIN_DEG = 7.0  # the paper's threshold for "correct" gaze
PUPIL_FOUND_PX = 1.5  # detector within this of the label → the pupil is visible and found
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


# ---------------------------------------------------------------------------------------------
# Label preservation (the pupil detector lives in metrics/drift.py)


def _stats(values: np.ndarray) -> dict[str, float | None]:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):  # None, not NaN: metrics.json stays strict JSON
        return {"mean": None, "std": None, "median": None, "p95": None}
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95))}


def _detector_error(detected: np.ndarray, labels: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Detector vs label distance: statistics over the found pupils, the found share, the overall median."""
    error = np.linalg.norm(detected - labels, axis=1)
    found = error <= PUPIL_FOUND_PX
    return {**_stats(error[found]), "found_share": float(found.mean()), "median_all": float(np.median(error))}, found


def label_preservation(synthetic: np.ndarray, refined: np.ndarray, pupil_xy: np.ndarray | None,
                       real_test: np.ndarray | None = None,
                       real_test_pupil_xy: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Pupil-shift statistics (and the per-pair shift lengths of the pairs that count)."""
    detected = detect_pupil(synthetic)
    shift = np.linalg.norm(pupil_shift(synthetic, refined, detected), axis=1)
    result: dict[str, Any] = {
        "method": (
            f"pupil = half-maximum centroid of the darkest pixels within {PUPIL_RADIUS} px of the darkest "
            "blurred spot (subpixel); the same estimator runs on the synthetic and the refined image from the "
            "same start; shift = distance between the two centres"
        ),
        "pairs": int(len(synthetic)),
    }
    if pupil_xy is not None:
        # Pupils hidden under a lid cannot be located in either image; their "shift" says nothing.
        result["detector_error_px_synthetic"], found = _detector_error(detected, pupil_xy)
        result["labels"] = "pupil_xy"
        result["pairs_counted"] = int(found.sum())
        result["rule"] = (f"pairs whose synthetic pupil the detector finds within {PUPIL_FOUND_PX} px of its "
                          "pupil_xy label (the rest are mostly pupils hidden by a lid)")
        shift = shift[found]
    else:
        result["labels"] = "none"
        result["pairs_counted"] = int(len(shift))
        result["rule"] = ("no pupil_xy labels: every pair counts, including ones whose pupil is hidden (the "
                          "detector then follows the darkest other structure); read the median beside the mean")
    if real_test is not None and real_test_pupil_xy is not None:
        # How far real appearance alone (glints, blur, noise) moves the detected centre: the measuring floor.
        result["detector_error_px_real_test"], _ = _detector_error(detect_pupil(real_test), real_test_pupil_xy)
    result["shift_px"] = _stats(shift)
    result["within_1_5px"] = float((shift <= 1.5).mean()) if len(shift) else None
    return result, shift


# ---------------------------------------------------------------------------------------------
# Downstream gaze


def train_gaze(train_images: np.ndarray, train_gaze_labels: np.ndarray, test_images: np.ndarray,
               test_gaze_labels: np.ndarray, cfg: EvaluateConfig, *, name: str = "gaze", seed: int = 0,
               threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a gaze estimator to convergence on one training set (`gaze.fit_gaze`) and test it on real_test.

    real_test is touched once, at the end: it never chooses anything. Returns the test
    summary, the per-image test errors, the per-epoch training loss and validation error,
    and the epoch kept.
    """
    model, info = fit_gaze(train_images, train_gaze_labels, cfg, name=name, seed=seed, threads=threads,
                           progress=progress)
    errors = angular_error_deg(run_model(model, test_images), test_gaze_labels).astype(np.float32)
    return {**gaze_summary(errors), **info, "test_rows": int(len(test_images)), "errors_deg": errors}


def run_gaze_variants(variants: dict[str, tuple[np.ndarray, np.ndarray]], test_images: np.ndarray,
                      test_gaze_labels: np.ndarray, cfg: EvaluateConfig, *, seeds: list[int] | None = None,
                      use_ray: bool = True, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Train one gaze estimator per variant {name: (images, gaze)} and seed; test each on real_test.

    Returns {name: [one `train_gaze` result per seed]}; seed s means the same init, data
    order and validation ids in every variant (`cfg.seeds` unless given). With Ray: one
    task per (variant, seed), a whole GPU each when the cluster has GPUs; on CPUs each
    task gets an even share of the cores (at least one) and torch is pinned to it, so
    tasks queue instead of thrashing. Without Ray: one after the other in this process.
    """
    seeds = list(cfg.seeds if seeds is None else seeds)
    jobs = [(name, s) for name in variants for s in seeds]
    if not use_ray:
        results = {job: train_gaze(*variants[job[0]], test_images, test_gaze_labels, cfg, name=job[0], seed=job[1],
                                   progress=progress) for job in jobs}
    else:
        import ray

        from simgan_dist.ray_cluster import connect

        connect()  # the job's cluster under `ray job submit`, a registered one, or a local instance
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) >= 1:
            options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            threads = None
        else:
            node_cpus = max((node["Resources"].get("CPU", 1) for node in ray.nodes() if node["Alive"]), default=1)
            threads = int(max(1, min(resources.get("CPU", 1) // len(jobs), node_cpus)))
            options = {"num_cpus": threads}
        task = ray.remote(train_gaze).options(**options, max_retries=1)
        test_ref, test_labels_ref = ray.put(test_images), ray.put(test_gaze_labels)
        data_refs = {name: (ray.put(x), ray.put(y)) for name, (x, y) in variants.items()}
        refs = [task.remote(*data_refs[name], test_ref, test_labels_ref, cfg, name=name, seed=s, threads=threads,
                            progress=progress) for name, s in jobs]
        results = dict(zip(jobs, ray.get(refs), strict=True))
    return {name: [results[(name, s)] for s in seeds] for name in variants}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value) over seeds."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize_gaze(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over seeds: mean ± std of each test statistic, and the per-seed results."""
    summary: dict[str, Any] = {}
    for key in ("mean_deg", "median_deg", "within_7deg"):
        summary[key], summary[f"{key}_std"] = _mean_std([r[key] for r in runs])
    per_seed = [{k: v for k, v in r.items() if k != "errors_deg"} for r in runs]
    return {**summary, "model": runs[0]["model"], "seeds": [r["seed"] for r in runs],
            "train_rows": runs[0]["train_rows"], "val_rows": runs[0]["val_rows"], "test_rows": runs[0]["test_rows"],
            "seconds": round(sum(r["seconds"] for r in runs), 1), "loss_curve": runs[0]["loss_curve"],
            "per_seed": per_seed}


def paired_improvement(baseline: list[dict[str, Any]], treated: list[dict[str, Any]]) -> dict[str, Any]:
    """Relative error reduction of `treated` over `baseline`, seed by seed (positive = treated better)."""
    per_seed = [(b["mean_deg"] - t["mean_deg"]) / b["mean_deg"] for b, t in zip(baseline, treated, strict=True)]
    mean, std = _mean_std(per_seed)
    gain_7, gain_7_std = _mean_std([t["within_7deg"] - b["within_7deg"] for b, t in zip(baseline, treated,
                                                                                       strict=True)])
    return {"mean": mean, "std": std, "per_seed": per_seed, "seeds": [b["seed"] for b in baseline],
            "within_7deg_gain": gain_7, "within_7deg_gain_std": gain_7_std}


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

    _log("label preservation: pupil shift")
    preservation, shifts = label_preservation(data.synthetic, data.refined, data.pupil_xy, data.real_test,
                                              data.real_test_pupil_xy)

    _log("realism: kernel distance to held-out real_test images")
    rng = np.random.default_rng(seed)
    n_a = min(cfg.evaluate.realism_samples, len(data.ids))
    n_b = min(cfg.evaluate.realism_samples, len(data.real_test))
    pick = np.sort(rng.choice(len(data.ids), n_a, replace=False))  # the same pairs for both scores
    reference = data.real_test[np.sort(rng.choice(len(data.real_test), n_b, replace=False))]
    # the space training and Tune score in: a gaze CNN fitted to the synthetic labels
    features = GazeFeatures(data.synthetic[:FEATURE_NET_ROWS], data.gaze[:FEATURE_NET_ROWS], seed)
    realism = {
        "feature_space": (f"penultimate layer of a small gaze CNN trained on the first {FEATURE_NET_ROWS:,} synthetic "
                          "images' gaze labels (realism.GazeFeatures, seeded)"),
        "distance": "unbiased MMD², mixture of RBF kernels, features standardised by the real set",
        "reference": "real_test images (held out: the refiner never saw them)",
        "samples": [int(n_a), int(n_b)], "seed": seed,
        "refined_vs_real": realism_score(data.refined[pick], reference, seed, features),
        "synthetic_vs_real": realism_score(data.synthetic[pick], reference, seed, features),
    }

    _log("artifacts: border frame and power spectrum, refined vs real_test")
    artifacts = artifact_metrics({"synthetic": data.synthetic[pick], "refined": data.refined[pick],
                                  "real": reference})

    variants = {"synthetic": (data.synthetic, data.gaze), "refined": (data.refined, data.gaze)}
    if data.real is not None:
        variants["real"] = (data.real, data.real_gaze)
    ev = cfg.evaluate
    _log(f"downstream gaze: training {len(variants)} x {len(ev.seeds)} {ev.gaze_model} estimators "
         f"({', '.join(variants)}; seeds {ev.seeds}; at most {ev.gaze_epochs} epochs, best on a held-out "
         f"{ev.gaze_val_fraction:.0%} of each training set)" + (" as Ray tasks" if use_ray else " in this process"))
    runs = run_gaze_variants(variants, data.real_test, data.real_test_gaze, ev, use_ray=use_ray, progress=progress)
    # Per-image errors pooled over seeds, for the error CDF.
    errors = {name: np.concatenate([r["errors_deg"] for r in seed_runs]) for name, seed_runs in runs.items()}
    paired = paired_improvement(runs["synthetic"], runs["refined"])
    gaze = {
        "model": ev.gaze_model,
        "seeds": list(ev.seeds),
        "rule": (f"each estimator trains for at most {ev.gaze_epochs} epochs; {ev.gaze_val_fraction:.0%} of its own "
                 f"training set (seeded, the same ids in every variant) is held out, training stops after "
                 f"{ev.gaze_patience} epochs without a lower validation error and the best epoch is tested on "
                 "real_test; seed s gives every variant the same init, order and held-out ids"),
        "variants": {name: summarize_gaze(seed_runs) for name, seed_runs in runs.items()},
        "relative_improvement": paired["mean"],
        "relative_improvement_std": paired["std"],
        "relative_improvement_per_seed": paired["per_seed"],
        "within_7deg_gain": paired["within_7deg_gain"],
        "within_7deg_gain_std": paired["within_7deg_gain_std"],
    }
    syn, ref = gaze["variants"]["synthetic"], gaze["variants"]["refined"]
    diff = data.refined[pick].astype(np.int16) - data.synthetic[pick].astype(np.int16)
    metrics = {
        "version": METRICS_VERSION,
        "inputs": {"synthetic": synthetic, "refined": refined, "real_test": real_test, "real": real,
                   "run": str(run) if run else None, "pairs": int(len(data.ids)),
                   "corpus_pairs": data.corpus_pairs, "max_train_rows": cfg.evaluate.max_train_rows,
                   "real_rows": None if data.real is None else int(len(data.real)),
                   "corpus_real_rows": data.corpus_real,
                   "real_test_rows": int(len(data.real_test)), "notes": data.notes},
        "config": {"evaluate": cfg.to_dict()["evaluate"], "seed": seed},
        "gaze": gaze,
        "label_preservation": preservation,
        "realism": realism,
        "artifacts": artifacts,
        "refinement": {"mean_abs_change_gray_levels": float(np.abs(diff).mean())},
        "headline": {
            "gaze_error_synthetic_deg": syn["mean_deg"],
            "gaze_error_synthetic_deg_std": syn["mean_deg_std"],
            "gaze_error_refined_deg": ref["mean_deg"],
            "gaze_error_refined_deg_std": ref["mean_deg_std"],
            "relative_improvement": gaze["relative_improvement"],
            "relative_improvement_std": gaze["relative_improvement_std"],
            "gaze_seeds": len(ev.seeds),
            "pupil_shift_px": preservation["shift_px"]["mean"],
            "pupil_shift_px_std": preservation["shift_px"]["std"],
            "realism_refined": realism["refined_vs_real"],
            "realism_synthetic": realism["synthetic_vs_real"],
            "frame_score_refined": artifacts["border"]["refined"]["frame_score"],
            "frame_score_real": artifacts["border"]["real"]["frame_score"],
            "spectrum_distance_refined": artifacts["vs_real"]["refined"]["spectrum_log_distance"],
            "spectrum_distance_synthetic": artifacts["vs_real"]["synthetic"]["spectrum_log_distance"],
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    report_path = report.write_report(out, metrics, data, errors, shifts, curves, seed=seed)
    _print_headline(metrics, report_path)
    return metrics


def _print_headline(metrics: dict[str, Any], report_path: Path) -> None:
    h = metrics["headline"]
    for name, r in metrics["gaze"]["variants"].items():
        _log(f"gaze trained on {name:9s}: {r['mean_deg']:.2f} ± {r['mean_deg_std']:.2f}° mean error, "
             f"{100 * r['within_7deg']:.1f}% within 7° ({len(r['seeds'])} seeds)")
    shift = metrics["label_preservation"]["shift_px"]
    per_seed = ", ".join(f"{100 * g:+.1f}%" for g in metrics["gaze"]["relative_improvement_per_seed"])
    _log(f"refined vs synthetic: gaze error {h['gaze_error_synthetic_deg']:.2f}° → "
         f"{h['gaze_error_refined_deg']:.2f}° ({report.describe_change(h['relative_improvement'])} ± "
         f"{100 * h['relative_improvement_std']:.1f}%, paired over seeds: {per_seed})")
    _log(f"pupil shift: {shift['mean']:.2f} ± {shift['std']:.2f} px; realism (lower = more real): refined "
         f"{h['realism_refined']:.4f} vs synthetic {h['realism_synthetic']:.4f}")
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
