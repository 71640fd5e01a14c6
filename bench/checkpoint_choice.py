"""Which checkpoint should refine use? The regret of each choice rule over training seeds (issue 23, item 2).

Input: demo output folders that kept every scored checkpoint, one per training seed:

    for s in 0 1 2 3 4; do SEED=$s DEMO_SET="train.keep_best=100" bash jobs/demo.sh /tmp/runs/s$s; done
    python bench/checkpoint_choice.py /tmp/runs/s0 /tmp/runs/s1 /tmp/runs/s2 /tmp/runs/s3 /tmp/runs/s4

For each folder, the sweep's winning trial (`sweeps/demo/best_checkpoint.txt`): its checkpoints from
step `--from` on, every `--every`-th scored one, are measured downstream: the synthetic corpus refined
in this process, the small gaze estimator trained on it for each `--seeds` (the instrument `evaluate`
uses) and tested on real_test, paired with the same seeds on the synthetic corpus; also the pupil shift.
Each rule then chooses among those measured checkpoints from the run's objective history alone
(`monitor/metrics.jsonl`: what training saw, scored on `train.eval_samples` images, never real_test), and
from the same history rescored on `--rescore N` synthetic images (every checkpoint of the trial, against
the same held-out real images). Regret = the best measured gain minus the chosen checkpoint's. Rules:

  latest      the last checkpoint (no choice at all)
  lowest      the lowest objective (training's keep_best, `refine --checkpoint RUN_DIR` until issue 23)
  trailing3   the lowest mean objective over the checkpoint's evaluation and the two before it
  centred3    the lowest mean over the evaluation before, its own and the one after
  latest1se   the latest checkpoint whose objective is within one standard error (`objective_se`) of
              the lowest: differences inside the score's own noise do not count, and the gain grows
              with training while D has not won yet

Measurements are cached in OUT/measured.jsonl and rescored histories in OUT/rescored.jsonl (resumable).
Prints a Markdown table per history.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from objective_validation import refine_array

from simgan_dist.config import load_config
from simgan_dist.data.schema import load_numpy
from simgan_dist.evaluate import read_run_metrics, train_estimator
from simgan_dist.metrics.drift import drift_tolerance_px
from simgan_dist.metrics.objective import REALISM_FLOOR, Evaluator, combine
from simgan_dist.metrics.preservation import label_preservation
from simgan_dist.train.checkpoint import load_checkpoint_config, load_refiner

SCORE_PARTS = ("realism", "realism_se", "realism_synthetic", "drift")


def score_history(run: Path) -> dict[int, dict[str, float]]:
    """{step: the objective's parts} of every evaluation the run made (metrics.jsonl)."""
    return {int(r["step"]): {k: float(r[k]) for k in SCORE_PARTS} for r in read_run_metrics(run)
            if isinstance(r.get("objective"), float) and np.isfinite(r["objective"])}


def objectives(history: dict[int, dict[str, float]], tolerance_px: float) -> dict[int, tuple[float, float]]:
    """{step: (objective, its standard error)} under a drift tolerance."""
    return {step: (combine(p["realism"], p["realism_synthetic"], p["drift"], 55, tolerance_px),
                   p["realism_se"] / max(p["realism_synthetic"], REALISM_FLOOR))
            for step, p in history.items()}


def window_mean(scores: dict[int, tuple[float, float]], step: int, before: int, after: int) -> float:
    steps = sorted(scores)
    i = steps.index(step)
    return float(np.mean([scores[s][0] for s in steps[max(0, i - before):i + after + 1]]))


def latest_within_error(scores: dict[int, tuple[float, float]], candidates: list[int]) -> int:
    best = min(candidates, key=lambda s: scores[s][0])
    bound = scores[best][0] + scores[best][1]
    return max(s for s in candidates if scores[s][0] <= bound)


RULES = {
    "latest": lambda scores, candidates: max(candidates),
    "lowest": lambda scores, candidates: min(candidates, key=lambda s: scores[s][0]),
    "trailing3": lambda scores, candidates: min(candidates, key=lambda s: window_mean(scores, s, 2, 0)),
    "centred3": lambda scores, candidates: min(candidates, key=lambda s: window_mean(scores, s, 1, 1)),
    "latest1se": latest_within_error,
}


def rescored_history(run: Path, samples: int, cache_file: Path) -> dict[int, dict[str, float]]:
    """{step: the objective's parts} of every checkpoint of `run`, scored on `samples` synthetic images (cached)."""
    cached = {(d["run"], d["samples"]): d["history"] for d in
              map(json.loads, cache_file.read_text().splitlines() if cache_file.exists() else [])}
    if (str(run), samples) not in cached:
        folders = sorted(f for f in run.glob("checkpoint_*") if f.is_dir())
        cfg = load_checkpoint_config(str(folders[0]))
        cfg.train.eval_samples = samples
        evaluator = Evaluator.from_config(cfg)  # the run's own held-out real images and realism space
        history = {}
        for folder in folders:
            scores = evaluator(load_refiner(str(folder))[0])
            history[int(folder.name.split("_")[1])] = {k: scores[k] for k in SCORE_PARTS}
        with cache_file.open("a") as f:
            f.write(json.dumps({"run": str(run), "samples": samples, "history": history}) + "\n")
        cached[str(run), samples] = history
    return {int(step): parts for step, parts in cached[str(run), samples].items()}


class Measurements:
    """Downstream measurements of checkpoints, cached in a JSON-lines file."""

    def __init__(self, path: Path, cfg, seeds: range):
        self.path, self.cfg, self.seeds = path, cfg, seeds
        self.cache = {(d["checkpoint"], d["seed"]): d for d in
                      map(json.loads, path.read_text().splitlines() if path.exists() else [])}

    def measured(self, checkpoint: str) -> bool:
        """Whether every seed of `checkpoint` is in the cache (its folder may be gone since)."""
        return all((checkpoint, seed) in self.cache for seed in self.seeds)

    def __call__(self, checkpoint: str, synthetic: dict, test: dict) -> list[dict]:
        """Per seed: the gaze error of the estimator trained on `checkpoint`'s refined corpus (or on the
        synthetic corpus for checkpoint "synthetic:<data>") and the pupil shift."""
        for seed in self.seeds:
            if (checkpoint, seed) in self.cache:
                continue
            raw = checkpoint.startswith("synthetic:")
            images = synthetic["image"] if raw else refine_array(checkpoint, synthetic["image"])
            result = train_estimator(images, synthetic["gaze"], test["image"], test["gaze"], self.cfg.evaluate,
                                seed=seed, progress=False)
            shift = None if raw else label_preservation(synthetic["image"], images,
                                                        synthetic["pupil_xy"])[0]["shift_px"]["mean"]
            self.cache[checkpoint, seed] = {"checkpoint": checkpoint, "seed": seed, "mean_deg": result["mean_deg"],
                                            "shift_px": shift}
            with self.path.open("a") as f:
                f.write(json.dumps(self.cache[checkpoint, seed]) + "\n")
        return [self.cache[checkpoint, seed] for seed in self.seeds]


def choices(demo: Path, measure: Measurements, first: int, every: int, rescore: int, tolerances: list[float],
            out: Path) -> dict:
    """The winning trial's measured checkpoints and what each rule chooses among them, per history."""
    data = demo / "data"
    synthetic = load_numpy(str(data / "synthetic"), columns=["image", "gaze", "pupil_xy"])
    test = load_numpy(str(data / "real_test"), columns=["image", "gaze"])  # the final measurement only
    run = Path((demo / "sweeps" / "demo" / "best_checkpoint.txt").read_text().split()[0]).parent
    history = score_history(run)
    trained = objectives(history, drift_tolerance_px(55))
    baseline = [r["mean_deg"] for r in measure(f"synthetic:{data}", synthetic, test)]
    measured = {}
    for step in [s for s in sorted(history) if s >= first][::every]:
        checkpoint = str(run / f"checkpoint_{step:09d}")
        if not (Path(checkpoint).is_dir() or measure.measured(checkpoint)):
            print(f"{demo.name} step {step}: not kept and not measured before; left out", flush=True)
            continue
        results = measure(checkpoint, synthetic, test)
        gain = float(np.mean([(b - r["mean_deg"]) / b for b, r in zip(baseline, results, strict=True)]))
        measured[step] = {"gain": gain, "shift_px": results[0]["shift_px"], "objective": trained[step][0]}
        print(f"{demo.name} step {step}: objective {trained[step][0]:.3f} ± {trained[step][1]:.3f}, "
              f"gain {100 * gain:+.1f}%, "
              f"shift {results[0]['shift_px']:.2f} px", flush=True)
    best = max(measured, key=lambda s: measured[s]["gain"])
    histories = {"training": history}
    if rescore:
        rescored = rescored_history(run, rescore, out / "rescored.jsonl")
        histories[f"{rescore} images"] = {s: rescored[s] for s in history if s in rescored}
    row = {"demo": demo.name, "trial": run.name, "best_step": best, "best_gain": measured[best]["gain"],
           "measured": measured, "rules": {}}
    for (label, parts), tolerance in itertools.product(histories.items(), tolerances):
        scores = objectives(parts, tolerance)
        for name, rule in RULES.items():
            if name == "latest" and (label, tolerance) != ("training", tolerances[0]):
                continue  # the same choice under every history
            chosen = rule(scores, list(measured))
            row["rules"][f"{name} ({label}, {tolerance:g} px)"] = {
                "step": chosen, "gain": measured[chosen]["gain"], "shift_px": measured[chosen]["shift_px"],
                "regret": measured[best]["gain"] - measured[chosen]["gain"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+", help="demo output folders (DEMO_SET=train.keep_best=100)")
    parser.add_argument("--out", default="bench/checkpoint_choice")
    parser.add_argument("--config", default="jobs/configs/tiny.yaml")
    parser.add_argument("--from", dest="first", type=int, default=500, help="first step measured")
    parser.add_argument("--every", type=int, default=2, help="measure every N-th scored checkpoint")
    parser.add_argument("--seeds", type=int, default=1, help="gaze estimator seeds per checkpoint")
    parser.add_argument("--rescore", type=int, default=1024, help="also rank on this many images (0: no)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1.5, 1.2],
                        help="the objective's drift tolerance (px on a 55 px eye): one set of rules each")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measure = Measurements(out / "measured.jsonl", load_config("tiny", args.config), range(args.seeds))
    rows = [choices(Path(demo), measure, args.first, args.every, args.rescore, args.tolerances, out)
            for demo in args.demos]
    (out / "rules.json").write_text(json.dumps(rows, indent=2) + "\n")
    rules = list(rows[0]["rules"])
    print(f"\n| rule | {' | '.join(row['demo'] for row in rows)} | regret, mean ± std (points) | pupil shift (px) |")
    print("|---|" + "---|" * len(rows) + "---|---|")
    best = [f"{row['best_step']}: {100 * row['best_gain']:+.1f}%" for row in rows]
    print(f"| best measured | {' | '.join(best)} | | |")
    for rule in rules:
        chosen = [row["rules"][rule] for row in rows]
        regrets = [100 * c["regret"] for c in chosen]
        cells = [f"{c['step']}: {100 * c['gain']:+.1f}%" for c in chosen]
        spread = np.std(regrets, ddof=1) if len(regrets) > 1 else 0.0
        shifts = [c["shift_px"] for c in chosen]
        print(f"| {rule} | {' | '.join(cells)} | {np.mean(regrets):.1f} ± {spread:.1f} | "
              f"{np.mean(shifts):.2f} (max {max(shifts):.2f}) |")


if __name__ == "__main__":
    main()
