"""What the shared history buffer costs each D step, with 1, 2, 4 and 8 training workers.

    python bench/history_cost.py --workers 1 2 4 8 --steps 200         # eye preset: b/2 = 256 images of 35x55

Each simulated worker is a Ray actor holding a `SharedHistory` client over the run's shard
actors and doing, per D step, exactly what training does: take the prefetched sample
(`sample`), push b/2 fresh refined images (`push`: device→host copy of uint8 codes,
fire-and-forget) which also asks for the next sample. `--gap-ms` is the compute between two
D steps (K_g refiner steps + the D step itself), during which the prefetch travels.
Reported per D step: the time a worker is blocked in the buffer (median and p90 over all
workers' steps) and the bytes it moves (push + sample, payload only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import ray
import torch

from simgan_dist.config import load_config
from simgan_dist.train import distributed_history as dh


@ray.remote(num_cpus=0)
class Worker:
    def __init__(self, run: str, shards: int, half: int, shape: tuple[int, ...]):
        torch.set_num_threads(1)
        self.history = dh.SharedHistory(dh.get_shards(run, shards), sample_size=half)
        self.images = torch.rand(half, *shape) * 2 - 1

    def run(self, steps: int, gap_s: float) -> list[float]:
        blocked = []
        self.history.push(self.images)  # the first D step has no sample to take
        for _ in range(steps):
            time.sleep(gap_s)
            start = time.perf_counter()
            self.history.sample(len(self.images))
            self.history.push(self.images)
            blocked.append(time.perf_counter() - start)
        self.history.flush()
        return blocked


def measure(workers: int, cfg, steps: int, gap_s: float) -> dict:
    half = cfg.train.batch_size // 2
    shape = (cfg.model.image_channels, cfg.model.image_height, cfg.model.image_width)
    run = f"history-bench-{os.getpid()}-{workers}"
    dh.create_shards(run, cfg.train.buffer_size * workers, shape, cfg.train.buffer_shards, 0)
    try:
        clients = [Worker.remote(run, cfg.train.buffer_shards, half, shape) for _ in range(workers)]
        times = [t for ts in ray.get([c.run.remote(steps, gap_s) for c in clients]) for t in ts[10:]]
    finally:
        dh.destroy_shards(run, cfg.train.buffer_shards)
    image_bytes = shape[0] * shape[1] * shape[2]  # uint8 codes
    times.sort()
    return {"workers": workers, "median_ms": round(1e3 * statistics.median(times), 2),
            "p90_ms": round(1e3 * times[int(0.9 * len(times))], 2),
            "bytes_per_d_step_per_worker": 2 * half * image_bytes,
            "bytes_per_d_step_all_workers": 2 * half * image_bytes * workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="eye")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="compute between two D steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.preset, overrides=args.overrides)
    ray.init(num_cpus=max(args.workers) + 2, include_dashboard=False, log_to_driver=False)
    print(f"preset {args.preset}: batch {cfg.train.batch_size}, {cfg.train.buffer_shards} shards, "
          f"buffer {cfg.train.buffer_size}/worker, gap {args.gap_ms} ms, load avg {os.getloadavg()[0]:.1f}")
    for workers in args.workers:
        row = measure(workers, cfg, args.steps, args.gap_ms / 1e3)
        print(json.dumps(row), flush=True)
    print(f"load avg after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
