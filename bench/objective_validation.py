"""Does the label-free objective rank refiners like the downstream task? (issue 9 item 4, issue 26 item 3)

For each of N trials spanning the sweep's space (K_g, lr, λ) on the demo corpus:
train with `train --local` and the periodic evaluation on, keeping every scored checkpoint;
score each of them with the objective as the code now defines it (`objective.Evaluator`, what
training computes at every `train.eval_every` step, so a trained trial never needs retraining
when the objective changes); take the one a sweep would refine with (`objective.choose`: the
latest within one standard error of the lowest; the eye tables in bench/RESULTS.md took the
lowest); refine the whole synthetic corpus with it; train the downstream estimator on the
refined images (`evaluate.train_estimator`, the function `simgan-dist evaluate` runs for its
"refined" row: gaze for eyes, the 16 joints' positions for hand depth maps) for each seed and
test it on real_test. Then Spearman(objective, mean
downstream error) over the trials, and the same along every run (`--along`: the error of every
`--along`-th checkpoint, seed 0). For eyes also the sweep's judge of completed trials
(`tune_judge.judge_checkpoint`, the spread of a gaze estimator trained on the refined eyes, as `tune`
computes it) and Spearman(judge, error): on the chosen checkpoints, and with `--extra-step S` on
each run's step-S checkpoint too (checkpoints the judge was not developed on). real_test is read only
for those final measurements, never by training, checkpoint choice or the judge. The kind (eye or
hand) is the corpus's: its manifest says.

    simgan-dist simulate --out demo_output/data --synthetic 4000 --real 2000 --real-test 1000 --seed 0
    nice -n 5 python bench/objective_validation.py --data demo_output/data --out OUT --trials 10 --seeds 3 \
        --iterations 600 --extra-step 700  # bench/RESULTS.md issue 23, 6.
    # hands: the hand demo's corpus and recipe (jobs/configs/hand-tiny.yaml)
    simgan-dist simulate --kind hand --hand-size 64 --out demo_output/hand/data \
        --synthetic 4000 --real 2000 --real-test 1000 --seed 0
    python bench/objective_validation.py --data demo_output/hand/data --out OUT --trials 8 --seeds 3

Trained runs stay under OUT/runs/; each downstream measurement is cached in OUT/downstream.jsonl by
checkpoint, seed and estimator, so a rerun only measures what is new (resumable): the same OUT
with `--gaze-model gazenet` measures the same chosen checkpoints with the paper's GazeNet (eyes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from simgan_dist.config import load_config
from simgan_dist.core.imaging import refine_images
from simgan_dist.data.schema import load_numpy, read_manifest
from simgan_dist.evaluate import SUMMARY_KEYS, train_estimator
from simgan_dist.evaluate_inputs import TASK_LABELS
from simgan_dist.metrics.estimators import TASKS
from simgan_dist.metrics.objective import Evaluator, choose
from simgan_dist.train.checkpoint import load_refiner
from simgan_dist.train.local import train_local
from simgan_dist.tune_judge import judge_checkpoint
from simgan_dist.tune_space import apply_params

# Spread over each demo recipe's space, around its own setting; fixed order.
TRIALS = {
    # jobs/configs/tiny.yaml: λ weighs the per-pixel mean |R(x) − x| (loss.reg_reduction=mean); K_g 2, lr 1e-3, λ 2
    "eye": [
        {"k_g": 1, "lr": 1e-3, "lambda_reg": 0.5},
        {"k_g": 2, "lr": 3e-4, "lambda_reg": 5.0},
        {"k_g": 5, "lr": 1e-4, "lambda_reg": 2.0},
        {"k_g": 2, "lr": 3e-3, "lambda_reg": 2.0},
        {"k_g": 1, "lr": 3e-4, "lambda_reg": 20.0},
        {"k_g": 5, "lr": 1e-3, "lambda_reg": 0.2},
        {"k_g": 2, "lr": 1e-3, "lambda_reg": 2.0},
        {"k_g": 1, "lr": 3e-3, "lambda_reg": 0.2},
        {"k_g": 5, "lr": 3e-4, "lambda_reg": 5.0},
        {"k_g": 2, "lr": 1e-4, "lambda_reg": 0.5},
    ],
    # jobs/configs/hand-tiny.yaml: the same mean reduction, λ 100x smaller (a depth map's band erasure moves
    # each of its pixels by ~1 unit); K_g 2, lr 1e-3, λ 0.01
    "hand": [
        {"k_g": 2, "lr": 1e-3, "lambda_reg": 0.01},
        {"k_g": 1, "lr": 3e-4, "lambda_reg": 1.0},
        {"k_g": 2, "lr": 3e-3, "lambda_reg": 0.03},
        {"k_g": 1, "lr": 1e-4, "lambda_reg": 0.01},
        {"k_g": 2, "lr": 1e-3, "lambda_reg": 0.1},
        {"k_g": 5, "lr": 1e-3, "lambda_reg": 0.001},
        {"k_g": 2, "lr": 3e-4, "lambda_reg": 0.3},
        {"k_g": 1, "lr": 3e-3, "lambda_reg": 0.003},
    ],
}
SCORE_KEYS = ("objective", "objective_se", "realism", "realism_synthetic", "drift")
RECIPES = {"eye": ("tiny", "jobs/configs/tiny.yaml"), "hand": ("hand-tiny", "jobs/configs/hand-tiny.yaml")}


def refine_array(checkpoint: str, images: np.ndarray) -> np.ndarray:
    return refine_images(load_refiner(checkpoint)[0], images, batch_size=512)


def score_checkpoints(run: Path, evaluator: Evaluator) -> list[dict]:
    """Every kept checkpoint of a run, scored with the current objective, in step order."""
    scored = []
    for folder in sorted((run / "best").glob("step_*")):
        refiner, _ = load_refiner(str(folder))
        scores = evaluator(refiner)
        scored.append({"step": int(folder.name.split("_")[1]), "checkpoint": str(folder),
                       **{k: scores[k] for k in SCORE_KEYS}})
    return scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with synthetic/, real/, real_test/ (simulate)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", help="the recipe (default: the demo's for the corpus's kind)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="downstream estimator seeds per trial")
    parser.add_argument("--along", type=int, default=0,
                        help="also measure every N-th checkpoint of each run (seed 0); 0: only the chosen ones")
    parser.add_argument("--epochs", type=int, default=15, help="the downstream estimator's epoch cap")
    parser.add_argument("--gaze-model", default="small", choices=("small", "gazenet"),
                        help="eyes' downstream estimator (gazenet: the paper's, ~10 CPU-minutes a run; a GPU day)")
    parser.add_argument("--iterations", type=int, help="adversarial iterations per trial (default: the recipe's)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--extra-step", type=int, action="append", default=[],
                        help="eyes: also judge and measure each run's checkpoint at this step (repeatable)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    kind = read_manifest(str(data / "synthetic")).extra["simulator"]
    label, task = TASK_LABELS[kind], TASKS[kind]
    unit, error_key = task.unit if task.unit == "°" else f" {task.unit}", SUMMARY_KEYS[label][0]
    model = args.gaze_model if kind == "eye" else "small-pose"
    if args.trials > len(TRIALS[kind]):
        raise SystemExit(f"--trials {args.trials}: {len(TRIALS[kind])} {kind} trials are defined")
    preset, recipe = RECIPES[kind]
    base = load_config(preset, args.config or recipe, [
        f"data.synthetic={data / 'synthetic'}", f"data.real={data / 'real'}", "data.real_test=",
        "data.real_val_fraction=0.1", *([f"train.iterations={args.iterations}"] if args.iterations else []),
        f"train.eval_every={args.eval_every}", "train.eval_samples=256", "train.keep_best=100000",
        f"train.storage_path={out / 'runs'}", f"evaluate.gaze_epochs={args.epochs}",
        *([f"evaluate.gaze_model={args.gaze_model}"] if kind == "eye" else [])])
    synthetic = load_numpy(base.data.synthetic, columns=["image", label])
    test = load_numpy(str(data / "real_test"), columns=["image", label])  # the final measurements only
    cache_file = out / "downstream.jsonl"
    cache = {(d["checkpoint"], d["seed"]): d["mean_error"] for d in
             map(json.loads, cache_file.read_text().splitlines() if cache_file.exists() else [])
             if d["model"] == model}

    def downstream_errors(checkpoint: str, seeds: range) -> list[float]:
        for seed in seeds:
            if (checkpoint, seed) not in cache:
                images = synthetic["image"] if checkpoint == "synthetic" else refine_array(checkpoint,
                                                                                           synthetic["image"])
                cache[checkpoint, seed] = train_estimator(images, synthetic[label], test["image"], test[label],
                                                          base.evaluate, task=task, seed=seed,
                                                          progress=False)[error_key]
                with cache_file.open("a") as f:
                    f.write(json.dumps({"checkpoint": checkpoint, "seed": seed, "model": model,
                                        "mean_error": cache[checkpoint, seed]}) + "\n")
        return [cache[checkpoint, seed] for seed in seeds]

    baseline = downstream_errors("synthetic", range(args.seeds))
    print(f"synthetic: {np.mean(baseline):.2f} ± {np.std(baseline):.2f}{unit} ({task.name})", flush=True)
    evaluator = Evaluator.from_config(base)  # every trial is scored on the same images in the same space
    trials, along, extra = [], [], []
    for i, params in enumerate(TRIALS[kind][:args.trials]):
        cfg = apply_params(base, params)
        cfg.train.name = f"trial{i}"
        run = Path(cfg.train.storage_path) / cfg.train.name
        if not (run / "_trained").exists():
            train_local(cfg, run, progress=False)
            (run / "_trained").write_text("")
        scored = score_checkpoints(run, evaluator)
        best = scored[choose([(s["objective"], s["step"]) for s in scored], [s["objective_se"] for s in scored])]
        errors = downstream_errors(best["checkpoint"], range(args.seeds))
        judge = judge_checkpoint(base, best["checkpoint"]) if kind == "eye" else {}
        trials.append({"trial": i, **params, **best, **judge, "errors": errors, "mean_error": float(np.mean(errors))})
        print(json.dumps(trials[-1]), flush=True)
        for step in args.extra_step:
            checkpoint = str(run / "best" / f"step_{step:07d}")
            if kind == "eye" and Path(checkpoint).is_dir():
                errors = downstream_errors(checkpoint, range(args.seeds))
                extra.append({"trial": i, "step": step, **judge_checkpoint(base, checkpoint),
                              "mean_error": float(np.mean(errors)), "errors": errors})
                print(json.dumps(extra[-1]), flush=True)
        if args.along:
            along += [{**s, "error": downstream_errors(s["checkpoint"], range(1))[0]} for s in scored[::args.along]]
    print(f"| trial | K_g | lr | λ | objective | realism | drift px | best step | {task.name} error{unit} "
          f"(mean ± std, {args.seeds} seeds) | vs synthetic |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in sorted(trials, key=lambda d: d["objective"]):
        gain = 100 * (1 - d["mean_error"] / np.mean(baseline))
        print(f"| {d['trial']} | {d['k_g']} | {d['lr']:g} | {d['lambda_reg']:g} | {d['objective']:.3f} | "
              f"{d['realism']:.4f} | {d['drift']:.2f} | {d['step']} | {d['mean_error']:.2f} ± "
              f"{np.std(d['errors']):.2f} | {gain:+.1f} % |")
    if len(trials) >= 3:
        rho, p = spearmanr([d["objective"] for d in trials], [d["mean_error"] for d in trials])
        print(f"Spearman(objective, {task.name} error) over trials = {rho:.3f} (p = {p:.3g}, {len(trials)} trials)")
    steps = "/".join(map(str, args.extra_step))
    for name, rows in (("the chosen checkpoints", trials), (f"the step-{steps} checkpoints", extra)):
        if kind != "eye" or len(rows) < 3:
            continue
        print(f"\nThe judge on {name} (spread: the estimator's scatter on held-out real eyes, ratio: over its "
              f"scatter on its own; lower = better)\n")
        print(f"| trial | step | spread ° | spread ratio | {task.name} error{unit} (mean ± std) |")
        print("|---|---|---|---|---|")
        for d in sorted(rows, key=lambda d: d["spread_ratio"]):
            print(f"| {d['trial']} | {d['step']} | {d['spread']:.2f} | {d['spread_ratio']:.3f} | "
                  f"{d['mean_error']:.2f} ± {np.std(d['errors']):.2f} |")
        for key in ("spread_ratio", "spread"):
            rho, p = spearmanr([d[key] for d in rows], [d["mean_error"] for d in rows])
            print(f"Spearman({key}, {task.name} error) on {name} = {rho:.3f} (p = {p:.3g}, {len(rows)})")
        print(f"judge cost: {np.mean([d['spread_s'] for d in rows]):.1f} s per checkpoint")
    if len(along) >= 3:
        rho, p = spearmanr([d["objective"] for d in along], [d["error"] for d in along])
        print(f"Spearman(objective, {task.name} error) along the runs = {rho:.3f} (p = {p:.3g}, "
              f"{len(along)} checkpoints)")


if __name__ == "__main__":
    main()
