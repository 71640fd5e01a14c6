"""Training images/s: the Ray Train + DeepSpeed path next to the plain-PyTorch roofline, in one run.

Roofline: Algorithm 1's adversarial iterations (K_g R steps + K_d D steps) with plain torch
optimizers on random data already on the device (bf16 autocast + channels-last on GPU).
Ray path: `simgan_dist.train.fit` on a simulated dataset, steady-state images/s from its
reports (the first report, which includes start-up, is dropped).

    python bench/train_throughput.py --preset eye --workers 1 --iterations 60          # one GPU
    python bench/train_throughput.py --preset tiny --workers 2 --iterations 40 --cpu   # here
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import tempfile
import time

import torch

from simgan_dist.algorithm import Schedule, SimGAN, TorchUpdater
from simgan_dist.config import load_config
from simgan_dist.history import HistoryBuffer
from simgan_dist.losses import RefinerLoss
from simgan_dist.models import build_discriminator, build_refiner


def roofline(cfg, device: torch.device, iterations: int) -> float:
    bf16 = device.type == "cuda"
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    refiner = build_refiner(cfg.model).to(device, memory_format=memory_format)
    disc = build_discriminator(cfg.model).to(device, memory_format=memory_format)
    shape = (cfg.train.batch_size, cfg.model.image_channels, cfg.model.image_height, cfg.model.image_width)
    batch = (torch.rand(shape, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    algo = SimGAN(
        TorchUpdater(refiner, torch.optim.Adam(refiner.parameters(), lr=cfg.train.lr)),
        TorchUpdater(disc, torch.optim.Adam(disc.parameters(), lr=cfg.train.lr)),
        RefinerLoss(cfg.loss), HistoryBuffer(cfg.train.buffer_size, shape[1:]),
        Schedule(0, 0, iterations + 2, cfg.train.k_g, cfg.train.k_d), lambda: batch, lambda: batch, autocast,
    )
    for _ in range(2):  # warm-up
        algo.advance()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while not algo.done:
        algo.advance()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_iteration = cfg.train.batch_size * (cfg.train.k_g + cfg.train.k_d)
    return iterations * per_iteration / (time.perf_counter() - start)


def ray_path(cfg, iterations: int) -> float:
    from simgan_dist.data.simulate import simulate_dataset
    from simgan_dist.train import fit

    with tempfile.TemporaryDirectory() as folder:
        rows = max(4 * cfg.train.batch_size * cfg.train.num_workers, 2048)
        simulate_dataset(f"{folder}/data", synthetic=rows, real=rows // 2, real_test=0, seed=0)
        cfg.data.synthetic, cfg.data.real = f"{folder}/data/synthetic", f"{folder}/data/real"
        cfg.train.storage_path, cfg.train.name = f"{folder}/runs", "bench"
        cfg.train.pretrain_refiner_steps = cfg.train.pretrain_disc_steps = 0
        cfg.train.iterations, cfg.train.checkpoint_every = iterations, 10**9
        cfg.train.report_every = cfg.train.image_every = max(iterations // 6, 1)
        result = fit(cfg)
        if result.error:
            raise SystemExit(f"training failed: {result.error}")
        with open(f"{folder}/runs/bench/monitor/metrics.jsonl") as f:
            rates = [json.loads(line)["images_per_s"] for line in f][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="eye")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    use_gpu = torch.cuda.is_available() and not args.cpu
    cfg = load_config(args.preset, overrides=[*args.overrides, f"train.num_workers={args.workers}",
                                              f"train.use_gpu={str(use_gpu).lower()}"])
    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(1)  # like each Ray CPU worker (OMP_NUM_THREADS=1): per-worker parity
    name = torch.cuda.get_device_name() if use_gpu else "CPU"
    plain = roofline(cfg, device, args.iterations)
    print(f"roofline (plain PyTorch, 1 {name}): {plain:,.0f} images/s", flush=True)
    distributed = ray_path(cfg, args.iterations)
    per_worker = distributed / args.workers
    print(f"Ray Train + DeepSpeed ({args.workers} worker(s)): {distributed:,.0f} images/s "
          f"= {per_worker:,.0f} per worker = {per_worker / plain:.0%} of the roofline")


if __name__ == "__main__":
    main()
