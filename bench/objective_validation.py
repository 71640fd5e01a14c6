"""Does the label-free objective rank refiners like the downstream gaze task? (issue 9, item 4)

For each of N trials spanning the sweep's space (K_g, lr, λ) on the demo corpus:
train with `train --local` and the periodic evaluation on, take the run's best checkpoint by
the objective (`refine.choose_checkpoint`, what `refine --checkpoint RUN_DIR` uses), refine
the whole synthetic corpus with it, train the gaze estimator on the refined images
(`evaluate.train_gaze`, the function `simgan-dist evaluate` runs for its "refined" row) for each
seed and test it on real_test. Then Spearman(objective, mean gaze error) over the trials.
real_test is read only for that final measurement, never by training or checkpoint choice.

    simgan-dist simulate --out demo_output/data --synthetic 4000 --real 2000 --real-test 1000 --seed 0
    nice -n 5 python bench/objective_validation.py --data demo_output/data --out bench/objective_validation \
        --trials 8 --seeds 2

Each finished trial is appended to OUT/trials.jsonl; a rerun skips trials already there (resumable).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from simgan_dist.checkpoint import load_refiner
from simgan_dist.config import load_config
from simgan_dist.data.schema import load_numpy
from simgan_dist.evaluate import train_gaze
from simgan_dist.imaging import to_model_input, to_storage
from simgan_dist.local_train import train_local
from simgan_dist.refine import choose_checkpoint
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with synthetic/, real/, real_test/ (simulate)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="jobs/configs/tiny.yaml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2, help="gaze estimator seeds per trial")
    parser.add_argument("--gaze-epochs", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    base = load_config("tiny", args.config, [
        f"data.synthetic={data / 'synthetic'}", f"data.real={data / 'real'}", "data.real_test=",
        "data.real_val_fraction=0.1", f"train.iterations={args.iterations}", f"train.eval_every={args.eval_every}",
        "train.eval_samples=256", "train.keep_best=2", f"train.storage_path={out / 'runs'}",
        f"evaluate.gaze_epochs={args.gaze_epochs}"])
    synthetic = load_numpy(base.data.synthetic, columns=["image", "gaze"])
    test = load_numpy(str(data / "real_test"), columns=["image", "gaze"])  # the final measurement only
    log = out / "trials.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    def gaze_error(images: np.ndarray) -> list[float]:
        return [train_gaze(images, synthetic["gaze"], test["image"], test["gaze"], base.evaluate, seed=s,
                           progress=False)["mean_deg"] for s in range(args.seeds)]

    baseline_file = out / "synthetic.json"
    if not baseline_file.exists():
        baseline_file.write_text(json.dumps({"errors": gaze_error(synthetic["image"])}))
    baseline = json.loads(baseline_file.read_text())["errors"]
    print(f"synthetic: {np.mean(baseline):.2f} ± {np.std(baseline):.2f}°", flush=True)
    for i, params in enumerate(TRIALS[:args.trials]):
        if any(d["trial"] == i for d in done):
            continue
        start = time.perf_counter()
        cfg = apply_params(base, params)
        cfg.train.name = f"trial{i}"
        train_local(cfg, Path(cfg.train.storage_path) / cfg.train.name, progress=False)
        checkpoint = choose_checkpoint(str(Path(cfg.train.storage_path) / cfg.train.name), cfg)
        scores = json.loads((Path(checkpoint) / "scores.json").read_text())
        errors = gaze_error(refine_array(checkpoint, synthetic["image"]))
        record = {"trial": i, **params, **scores, "checkpoint": checkpoint, "gaze_errors": errors,
                  "gaze_mean": float(np.mean(errors)), "seconds": round(time.perf_counter() - start)}
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.append(record)
        print(json.dumps(record), flush=True)
    print("| trial | K_g | lr | λ | objective | realism | drift px | best step | gaze error ° (mean ± std) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sorted(done, key=lambda d: d["objective"]):
        print(f"| {d['trial']} | {d['k_g']} | {d['lr']:g} | {d['lambda_reg']:g} | {d['objective']:.3f} | "
              f"{d['realism']:.4f} | {d['drift']:.2f} | {d['step']} | {d['gaze_mean']:.2f} ± "
              f"{np.std(d['gaze_errors']):.2f} |")
    if len(done) >= 3:
        rho, p = spearmanr([d["objective"] for d in done], [d["gaze_mean"] for d in done])
        print(f"Spearman(objective, gaze error) = {rho:.3f} (p = {p:.3g}, {len(done)} trials)")


if __name__ == "__main__":
    main()
