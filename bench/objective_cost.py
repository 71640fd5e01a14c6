"""What one periodic evaluation costs next to training, at the demo's size (issue 9: < 5 %).

Times, in one process and interleaved (so a loaded machine slows both alike), the evaluation's
set-up once per run (`objective.Evaluator.from_config`: reading the held-out rows and fitting
the eyes' realism space, `GazeFeatures`), one evaluation of `train.eval_samples` images (the
Evaluator on the bare refiner) and Algorithm 1's adversarial iterations with the demo's model
(jobs/configs/tiny.yaml), in CPU seconds of this process. Share = (set-up + evaluations) /
(adversarial iterations + set-up + evaluations) over a run of `--iterations` iterations
evaluated every `--eval-every` (pretraining steps, cheaper and also evaluated, are left out of
the denominator, so this over-states the share).

    python bench/objective_cost.py --data demo_output/data --eval-samples 256 --eval-every 50 --iterations 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simgan_dist.config import load_config
from simgan_dist.core.models import build_refiner
from simgan_dist.data.schema import load_numpy
from simgan_dist.metrics.objective import Evaluator
from simgan_dist.train.local import train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=1000, help="adversarial iterations of the run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config("tiny", "jobs/configs/tiny.yaml", [
        f"data.synthetic={args.data}/synthetic", f"data.real={args.data}/real", "data.real_test=",
        "data.real_val_fraction=0.1", f"train.eval_samples={args.eval_samples}", "train.eval_every=0",
        "train.pretrain_refiner_steps=0", "train.pretrain_disc_steps=1", "train.report_every=1000",
        "train.image_every=1000", "train.checkpoint_every=1000"])
    cfg.train.eval_every = 1  # Evaluator.from_config reads the held-out rows as training would
    start = time.process_time()
    evaluator = Evaluator.from_config(cfg)
    setup_s = time.process_time() - start
    cfg.train.eval_every = 0
    synthetic = load_numpy(cfg.data.synthetic, columns=["image"])["image"]
    real = load_numpy(cfg.data.real, columns=["image"])["image"]
    refiner = build_refiner(cfg.model)
    eval_s, iteration_s = [], []
    for r in range(args.repeats):
        start = time.process_time()
        evaluator(refiner)
        eval_s.append(time.process_time() - start)
        iterations = 20
        cfg.train.iterations = iterations
        cfg.train.seed = r
        start = time.process_time()
        train_local(cfg, f"/tmp/objective_cost/{r}", synthetic, real, progress=False)
        iteration_s.append((time.process_time() - start) / (iterations + 1))
    ev, it = float(np.median(eval_s)), float(np.median(iteration_s))
    scoring = setup_s + args.iterations // args.eval_every * ev
    print(f"threads {torch.get_num_threads()}: set-up once per run {setup_s:.1f} CPU s; one evaluation of "
          f"{args.eval_samples} images {ev:.2f} CPU s (runs: {', '.join(f'{x:.2f}' for x in eval_s)}); one "
          f"adversarial iteration {it:.3f} CPU s (K_g={cfg.train.k_g}, batch {cfg.train.batch_size}); "
          f"{args.iterations} iterations evaluated every {args.eval_every}: "
          f"{100 * scoring / (scoring + args.iterations * it):.1f} % of training time")


if __name__ == "__main__":
    main()
