"""The appearance oracle through the downstream instrument: what a perfect refiner would gain.

    DS_ACCELERATOR=cpu .venv/bin/python bench/quality.py --data demo_output/data \
        [--models small gazenet] [--seeds 0 1 2] [--refined DIR ...] [--set evaluate.gaze_epochs=15]

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
from simgan_dist.evaluate import paired_improvement, run_variants, summarize_runs
from simgan_dist.evaluate_inputs import _align_by_id

ORACLES = {
    "full oracle": APPEARANCE_PARTS,
    "deterministic oracle": DETERMINISTIC_PARTS,
    "light+blur+camera": ("light", "blur", "camera"),
}


def oracle_variants(data: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """{name: images} for synthetic and each oracle, aligned with the stored synthetic rows; their ids and gaze."""
    syn = load_numpy(f"{data}/synthetic", columns=["id", "image", "gaze"])
    seed = read_manifest(f"{data}/synthetic").extra["seed"]
    index = np.array([int(i.rsplit("-", 1)[1]) for i in syn["id"]])
    if not np.array_equal(index, np.arange(len(index))):
        raise SystemExit(f"{data}/synthetic: expected simulate's rows 0..n-1 in order")
    variants = {"synthetic": syn["image"]}
    for name, parts in ORACLES.items():
        rows = render_rows("eye", "synthetic", seed, 0, len(index), parts)
        assert np.array_equal(rows["id"], syn["id"]) and np.allclose(rows["gaze"], syn["gaze"])
        variants[name] = rows["image"]
    return variants, syn["id"], syn["gaze"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a simulate --kind eye output folder")
    parser.add_argument("--models", nargs="+", default=["small"], choices=["small", "gazenet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=None, help="subset of the oracle rows to train")
    parser.add_argument("--refined", nargs="*", default=[], help="refined datasets (synthetic ids) to add as rows")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-ray", action="store_true", help="train in this process, one after the other")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    variants, ids, gaze = oracle_variants(args.data)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in {"synthetic", *args.variants}}
    for uri in args.refined:
        refined = load_numpy(uri, columns=["id", "image"])
        variants[uri] = refined["image"][_align_by_id(ids, refined["id"], uri)]
    test = load_numpy(f"{args.data}/real_test", columns=["image", "gaze"])
    report = {"data": args.data, "seeds": args.seeds, "models": {}}
    for model in args.models:
        cfg = load_config(args.preset, overrides=[f"evaluate.gaze_model={model}", *args.overrides]).evaluate
        runs = run_variants({k: (v, gaze) for k, v in variants.items()}, test["image"], test["gaze"], cfg,
                                 seeds=args.seeds, use_ray=not args.no_ray, progress=False)
        rows = {}
        for name, seed_runs in runs.items():
            rows[name] = {"summary": summarize_runs(seed_runs),
                          "vs_synthetic": paired_improvement(runs["synthetic"], seed_runs)}
        report["models"][model] = {"evaluate": cfg.__dict__ | {"seeds": args.seeds}, "rows": rows}
        oracle = rows.get("deterministic oracle", {}).get("vs_synthetic", {}).get("mean")
        print(f"\n{model} estimator, seeds {args.seeds}, at most {cfg.gaze_epochs} epochs, "
              f"{cfg.gaze_val_fraction:.0%} held out, patience {cfg.gaze_patience}:\n")
        print("| training images | mean error on real_test | lower than synthetic (paired) | per seed | "
              "epochs kept |")
        print("|---|---|---|---|---|")
        for name, row in rows.items():
            s, p = row["summary"], row["vs_synthetic"]
            share = (f" ({p['mean'] / oracle:.0%} of the deterministic oracle)"
                     if oracle and name in args.refined else "")
            per_seed = ", ".join(f"{100 * g:+.1f}%" for g in p["per_seed"])
            epochs = ", ".join(str(r["best_epoch"]) for r in s["per_seed"])
            print(f"| {name} | {s['mean_deg']:.2f} ± {s['mean_deg_std']:.2f}° | "
                  f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}%{share} | {per_seed} | {epochs} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
