"""The appearance oracle through the downstream instrument: what a perfect refiner would gain.

    DS_ACCELERATOR=cpu .venv/bin/python bench/quality.py --data demo_output/data \
        [--models small gazenet] [--seeds 0 1 2] [--refined DIR ...] [--set evaluate.gaze_epochs=15]
    DS_ACCELERATOR=cpu .venv/bin/python bench/quality.py --data demo_output/hand/data --preset hand-tiny \
        [--refined DIR ...] [--real-trained]

The synthetic rows of `--data` (a `simulate` output) are re-rendered with the simulator's
own real appearance (`render_rows(..., appearance=parts)`: same ids, geometry, labels)
and each training set is scored by `evaluate.run_variants` (the instrument `evaluate`
uses: early stopping on a held-out 10% of each training set, one estimator per seed),
tested on the labeled `real_test`. Rows:

* synthetic — the clean render, what SimGAN starts from;
* full oracle — texture, light, glints, blur, camera response, noise: a perfect appearance transfer;
* deterministic oracle — light, glints, blur, camera only (no fresh per-pixel noise or random
  texture): what a deterministic refiner of a clean render can produce at best;
* light+blur+camera — the deterministic oracle without glints;
* each `--refined DIR` (a refined dataset with the synthetic ids), with its fraction of the
  deterministic oracle's gain.

Hand depth maps (`--data` a `simulate --kind hand` output): the rows are synthetic, the depth
oracle (the real sensor's artifacts on the synthetic geometry, `render_rows(..., ("kinect",))`),
`--real-trained` (as many labeled real maps, other rows than real_test's: the paper's real-data
row) and each `--refined DIR`, scored by the joint regressor (mean joint error in px, and the
share of joints within 5 px).

Prints a Markdown table per estimator: mean ± std over seeds, and the per-seed paired
relative improvement over synthetic (mean ± std). `--json FILE` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from simgan_dist.config import load_config
from simgan_dist.data.render import APPEARANCE_PARTS, DETERMINISTIC_PARTS
from simgan_dist.data.schema import load_numpy, read_manifest
from simgan_dist.data.simulate import render_rows
from simgan_dist.evaluate import SUMMARY_KEYS, paired_improvement, run_variants, summarize_runs
from simgan_dist.evaluate_inputs import TASK_LABELS, _align_by_id
from simgan_dist.metrics.estimators import TASKS

ORACLES = {
    "eye": {
        "full oracle": APPEARANCE_PARTS,
        "deterministic oracle": DETERMINISTIC_PARTS,
        "light+blur+camera": ("light", "blur", "camera"),
    },
    "hand": {"depth oracle": ("kinect",)},
}
CURVE_POINTS = (1, 2, 3, 5, 10)  # d (px) of the within-d curve the hand table prints
REFERENCE_ORACLE = {"eye": "deterministic oracle", "hand": "depth oracle"}  # what a refiner's gain is a share of


def oracle_variants(data: str) -> tuple[str, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The kind, {name: images} for synthetic and each oracle aligned with the stored synthetic rows, their ids
    and labels."""
    manifest = read_manifest(f"{data}/synthetic")
    kind = manifest.extra["simulator"]
    label = TASK_LABELS[kind]
    syn = load_numpy(f"{data}/synthetic", columns=["id", "image", label])
    seed = manifest.extra["seed"]
    index = np.array([int(i.rsplit("-", 1)[1]) for i in syn["id"]])
    if not np.array_equal(index, np.arange(len(index))):
        raise SystemExit(f"{data}/synthetic: expected simulate's rows 0..n-1 in order")
    variants = {"synthetic": syn["image"]}
    for name, parts in ORACLES[kind].items():
        rows = render_rows(kind, "synthetic", seed, 0, len(index), parts, hand_size=syn["image"].shape[1])
        assert np.array_equal(rows["id"], syn["id"]) and np.allclose(rows[label], syn[label])
        variants[name] = rows["image"]
    return kind, variants, syn["id"], syn[label]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a simulate --kind eye output folder")
    parser.add_argument("--models", nargs="+", default=["small"], choices=["small", "gazenet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=None, help="subset of the oracle rows to train")
    parser.add_argument("--refined", nargs="*", default=[], help="refined datasets (synthetic ids) to add as rows")
    parser.add_argument("--real-trained", action="store_true",
                        help="add a row trained on as many labeled real images (rendered: other rows than real_test)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-ray", action="store_true", help="train in this process, one after the other")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    kind, variants, ids, labels = oracle_variants(args.data)
    label, oracle_row = TASK_LABELS[kind], REFERENCE_ORACLE[kind]
    mean_key = SUMMARY_KEYS[label][0]
    unit = "°" if kind == "eye" else " px"
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in {"synthetic", *args.variants}}
    training = {name: (images, labels) for name, images in variants.items()}
    if args.real_trained:
        seed = read_manifest(f"{args.data}/synthetic").extra["seed"]
        # real_test's rows of another simulator seed: labeled real maps the test set does not hold
        real = render_rows(kind, "real_test", seed + 1000, 0, len(ids), hand_size=variants["synthetic"].shape[1])
        training["real-trained"] = (real["image"], real[label])
    for uri in args.refined:
        refined = load_numpy(uri, columns=["id", "image"])
        training[uri] = (refined["image"][_align_by_id(ids, refined["id"], uri)], labels)
    test = load_numpy(f"{args.data}/real_test", columns=["image", label])
    report = {"data": args.data, "seeds": args.seeds, "models": {}}
    for model in args.models if kind == "eye" else ["small-pose"]:
        cfg = load_config(args.preset, overrides=[*([f"evaluate.gaze_model={model}"] if kind == "eye" else []),
                                                  *args.overrides]).evaluate
        runs = run_variants(training, test["image"], test[label], cfg, task=TASKS[kind], seeds=args.seeds,
                            use_ray=not args.no_ray, progress=False)
        rows = {}
        for name, seed_runs in runs.items():
            rows[name] = {"summary": summarize_runs(seed_runs),
                          "vs_synthetic": paired_improvement(runs["synthetic"], seed_runs)}
        report["models"][model] = {"evaluate": cfg.__dict__ | {"seeds": args.seeds}, "rows": rows}
        oracle = rows.get(oracle_row, {}).get("vs_synthetic", {}).get("mean")
        print(f"\n{model} estimator, seeds {args.seeds}, at most {cfg.gaze_epochs} epochs, "
              f"{cfg.gaze_val_fraction:.0%} held out, patience {cfg.gaze_patience}:\n")
        curve = " within 7° (the paper's curve) |" if kind == "eye" else \
            f" % of joints within {', '.join(map(str, CURVE_POINTS))} px |"
        print("| training images | mean error on real_test | lower than synthetic (paired) | per seed | "
              f"epochs kept |{curve}")
        print("|---|---|---|---|---|---|")
        for name, row in rows.items():
            s, p = row["summary"], row["vs_synthetic"]
            share = (f" ({p['mean'] / oracle:.0%} of the {oracle_row})"
                     if oracle and name in args.refined else "")
            per_seed = ", ".join(f"{100 * g:+.1f}%" for g in p["per_seed"])
            epochs = ", ".join(str(r["best_epoch"]) for r in s["per_seed"])
            curve = (f" | {100 * s['within_7deg']:.1f} ± {100 * s['within_7deg_std']:.1f}%" if kind == "eye" else
                     " | " + " ".join(f"{100 * s['within_px_curve'][d]:.0f}" for d in CURVE_POINTS))
            print(f"| {name} | {s[mean_key]:.2f} ± {s[f'{mean_key}_std']:.2f}{unit} | "
                  f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}%{share} | {per_seed} | {epochs}{curve} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
