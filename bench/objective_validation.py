"""Does the label-free objective rank refiners like the downstream gaze task? (issue 9, item 4)

For each of N trials spanning the sweep's space (K_g, lr, λ) on the demo corpus:
train with `train --local` and the periodic evaluation on, keeping every scored checkpoint;
score each of them with the objective as the code now defines it (`objective.Evaluator`, what
training computes at every `train.eval_every` step, so a trained trial never needs retraining
when the objective changes); take the best; refine the whole synthetic corpus with it; train
the gaze estimator on the refined images (`evaluate.train_estimator`, the function
`simgan-dist evaluate` runs for its "refined" row) for each seed and test it on real_test.
Then Spearman(objective, mean gaze error) over the trials, and the same along every run
(`--along`: the gaze error of every `--along`-th checkpoint, seed 0). real_test is read only
for those final measurements, never by training or checkpoint choice.

    simgan-dist simulate --out demo_output/data --synthetic 4000 --real 2000 --real-test 1000 --seed 0
    nice -n 5 python bench/objective_validation.py --data demo_output/data --out bench/objective_validation \
        --trials 8 --seeds 3

Trained runs stay under OUT/runs/; each gaze measurement is cached in OUT/gaze.jsonl by
checkpoint, seed and estimator, so a rerun only measures what is new (resumable): the same OUT
with `--gaze-model gazenet` measures the same chosen checkpoints with the paper's GazeNet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from simgan_dist.config import load_config
from simgan_dist.core.imaging import to_model_input, to_storage
from simgan_dist.data.schema import load_numpy
from simgan_dist.evaluate import train_estimator
from simgan_dist.metrics.objective import Evaluator
from simgan_dist.train.checkpoint import load_refiner
from simgan_dist.train.local import train_local
from simgan_dist.tune import apply_params

# Spread over the demo recipe's space (jobs/configs/tiny.yaml: λ weighs the per-pixel mean |R(x) − x|,
# loss.reg_reduction=mean), around its K_g 2, lr 1e-3, λ 2; fixed order.
TRIALS = [
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
]


def refine_array(checkpoint: str, images: np.ndarray) -> np.ndarray:
    refiner, _ = load_refiner(checkpoint)
    with torch.no_grad():
        return np.concatenate([to_storage(refiner(to_model_input(images[i:i + 512])))
                               for i in range(0, len(images), 512)])


def score_checkpoints(run: Path, evaluator: Evaluator) -> list[dict]:
    """Every kept checkpoint of a run, scored with the current objective, in step order."""
    scored = []
    for folder in sorted((run / "best").glob("step_*")):
        refiner, _ = load_refiner(str(folder))
        scores = evaluator(refiner)
        scored.append({"step": int(folder.name.split("_")[1]), "checkpoint": str(folder),
                       **{k: scores[k] for k in ("objective", "realism", "realism_synthetic", "drift")}})
    return scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with synthetic/, real/, real_test/ (simulate)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="jobs/configs/tiny.yaml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="gaze estimator seeds per trial")
    parser.add_argument("--along", type=int, default=0,
                        help="also measure every N-th checkpoint of each run (seed 0); 0: only the chosen ones")
    parser.add_argument("--gaze-epochs", type=int, default=15)
    parser.add_argument("--gaze-model", default="small", choices=("small", "gazenet"),
                        help="the downstream estimator (gazenet: the paper's, ~10 CPU-minutes a run; a GPU day)")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    base = load_config("tiny", args.config, [
        f"data.synthetic={data / 'synthetic'}", f"data.real={data / 'real'}", "data.real_test=",
        "data.real_val_fraction=0.1", f"train.iterations={args.iterations}", f"train.eval_every={args.eval_every}",
        "train.eval_samples=256", "train.keep_best=100000", f"train.storage_path={out / 'runs'}",
        f"evaluate.gaze_epochs={args.gaze_epochs}", f"evaluate.gaze_model={args.gaze_model}"])
    synthetic = load_numpy(base.data.synthetic, columns=["image", "gaze"])
    test = load_numpy(str(data / "real_test"), columns=["image", "gaze"])  # the final measurements only
    cache_file = out / "gaze.jsonl"
    cache = {(d["checkpoint"], d["seed"]): d["mean_deg"] for d in
             map(json.loads, cache_file.read_text().splitlines() if cache_file.exists() else [])
             if d.get("model", "small") == args.gaze_model}

    def gaze_errors(checkpoint: str, seeds: range) -> list[float]:
        for seed in seeds:
            if (checkpoint, seed) not in cache:
                images = synthetic["image"] if checkpoint == "synthetic" else refine_array(checkpoint,
                                                                                           synthetic["image"])
                cache[checkpoint, seed] = train_estimator(images, synthetic["gaze"], test["image"], test["gaze"],
                                                     base.evaluate, seed=seed, progress=False)["mean_deg"]
                with cache_file.open("a") as f:
                    f.write(json.dumps({"checkpoint": checkpoint, "seed": seed, "model": args.gaze_model,
                                        "mean_deg": cache[checkpoint, seed]}) + "\n")
        return [cache[checkpoint, seed] for seed in seeds]

    baseline = gaze_errors("synthetic", range(args.seeds))
    print(f"synthetic: {np.mean(baseline):.2f} ± {np.std(baseline):.2f}°", flush=True)
    evaluator = Evaluator.from_config(base)  # every trial is scored on the same images in the same space
    trials, along = [], []
    for i, params in enumerate(TRIALS[:args.trials]):
        cfg = apply_params(base, params)
        cfg.train.name = f"trial{i}"
        run = Path(cfg.train.storage_path) / cfg.train.name
        if not (run / "_trained").exists():
            train_local(cfg, run, progress=False)
            (run / "_trained").write_text("")
        scored = score_checkpoints(run, evaluator)
        best = min(scored, key=lambda s: s["objective"])
        errors = gaze_errors(best["checkpoint"], range(args.seeds))
        trials.append({"trial": i, **params, **best, "gaze_errors": errors, "gaze_mean": float(np.mean(errors))})
        print(json.dumps(trials[-1]), flush=True)
        if args.along:
            along += [{**s, "gaze": gaze_errors(s["checkpoint"], range(1))[0]} for s in scored[::args.along]]
    print("| trial | K_g | lr | λ | objective | realism | drift px | best step | gaze error ° (mean ± std) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sorted(trials, key=lambda d: d["objective"]):
        print(f"| {d['trial']} | {d['k_g']} | {d['lr']:g} | {d['lambda_reg']:g} | {d['objective']:.3f} | "
              f"{d['realism']:.4f} | {d['drift']:.2f} | {d['step']} | {d['gaze_mean']:.2f} ± "
              f"{np.std(d['gaze_errors']):.2f} |")
    if len(trials) >= 3:
        rho, p = spearmanr([d["objective"] for d in trials], [d["gaze_mean"] for d in trials])
        print(f"Spearman(objective, gaze error) over trials = {rho:.3f} (p = {p:.3g}, {len(trials)} trials)")
    if len(along) >= 3:
        rho, p = spearmanr([d["objective"] for d in along], [d["gaze"] for d in along])
        print(f"Spearman(objective, gaze error) along the runs = {rho:.3f} (p = {p:.3g}, {len(along)} checkpoints)")


if __name__ == "__main__":
    main()
