"""What one periodic evaluation costs next to training, at the demo's size (issue 9: < 5 %).

Times, in one process and interleaved (so a loaded machine slows both alike), the evaluation
`train.eval_samples` images (objective.Evaluator on the bare refiner) and Algorithm 1's
adversarial iterations with the demo's model (jobs/configs/tiny.yaml), in CPU seconds of this
process. Share = eval / (eval_every × iteration) for the demo's schedule, counted over the whole
run (pretraining steps are cheaper than adversarial ones, so this over-states the share).

    python bench/objective_cost.py --data demo_output/data --eval-samples 256 --eval-every 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simgan_dist.config import load_config
from simgan_dist.data.schema import load_numpy
from simgan_dist.local_train import train_local
from simgan_dist.models import build_refiner
from simgan_dist.objective import Evaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config("tiny", "jobs/configs/tiny.yaml", [
        f"data.synthetic={args.data}/synthetic", f"data.real={args.data}/real", "data.real_test=",
        "data.real_val_fraction=0.1", f"train.eval_samples={args.eval_samples}", "train.eval_every=0",
        "train.pretrain_refiner_steps=0", "train.pretrain_disc_steps=1", "train.report_every=1000",
        "train.image_every=1000", "train.checkpoint_every=1000"])
    cfg.train.eval_every = 1  # Evaluator.from_config reads the held-out rows as training would
    evaluator = Evaluator.from_config(cfg)
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
    print(f"threads {torch.get_num_threads()}: one evaluation of {args.eval_samples} images {ev:.2f} CPU s "
          f"(runs: {', '.join(f'{x:.2f}' for x in eval_s)}); one adversarial iteration {it:.3f} CPU s "
          f"(K_g={cfg.train.k_g}, batch {cfg.train.batch_size}); every {args.eval_every} iterations: "
          f"{100 * ev / (ev + args.eval_every * it):.1f} % of training time")


if __name__ == "__main__":
    main()
