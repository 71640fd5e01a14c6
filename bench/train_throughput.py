"""Training images/s: the Ray Train + DeepSpeed step against the single-process loop, as a ratio, in one run.

Both sides train the same config on the same simulated corpus, adversarial iterations only
(no pretraining, no evaluation, no checkpoint before the last step), reporting and drawing
image grids at the config's cadence:

- plain: `train.local.train_local`, the product's single-process loop, in this process with
  `--threads` torch threads (default: one per Ray worker; several values: one plain run of
  each per round). It is the training step minus the distributed machinery: the same models,
  `make_optimizer` (fused Adam), uint8 `CodedHistory`, EMA and instance noise, batches of
  uint8 images normalised on the device. It runs the global batch (batch_size × workers) over
  the same logical buffer (buffer_size × workers), so a step handles as many images as all
  Ray workers together.
- ray: `train.fit` with `--workers` workers on this machine's local Ray instance: DeepSpeed
  engines, Ray Data shards, the shared history actors, Ray Train reports (threads per worker
  as Ray sets them, printed).

The corpus has the demo's size (4,000 synthetic, 2,000 real images), or 4 iterations' worth
when a step takes more (eye: K_g = 50): Ray Data's cost per epoch counts about as often as
in the demo. Ray renices its worker processes (nice 19 under a driver at 5); on a shared
machine that, not the code, would decide the ratio, so Ray's workers here keep the driver's
priority (`RAY_worker_niceness=0`), the plain loop's.

Throughput is the wall clock between a run's reports (metrics.jsonl `time`), so everything a
step does, reports included, is in it; the first fifth of the reports (start-up, warm-up) and
the last (the final checkpoint) are left out. The sides alternate (plain, ray, plain, ...) so
that load drifts show; each ratio is median(ray) / median(plain), and each Ray run is also set
against the mean of the two plain runs beside it (the "pairs", whose spread shows the noise).

    python bench/train_throughput.py --configs eye --workers 1 --iterations 60           # one GPU
    DS_ACCELERATOR=cpu python bench/train_throughput.py --cpu --configs tiny jobs/configs/tiny.yaml \
        --workers 1 2 --threads 1 2 --iterations 100 --repeats 3                          # here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from simgan_dist import console, ray_cluster
from simgan_dist.config import Config, config_from_dict, load_config
from simgan_dist.train import resources

SYNTHETIC, REAL = 4000, 2000  # the demo's corpus (README, `make demo`)
WARMUP_SHARE = 0.2
SETTLE_S = 10  # a finished run's Ray processes take seconds to exit: the next plain run must not pay for it


def config_for(name: str, overrides: list[str]) -> Config:
    """`name` is a preset or a YAML config file."""
    if name.endswith((".yaml", ".yml")):
        return load_config("tiny", name, overrides)  # the file's own `preset:` replaces "tiny"
    return load_config(name, overrides=overrides)


def steady_rate(metrics: Path, images_per_step: int) -> float:
    """images/s from the end of the warm-up to the second-to-last report, by their wall-clock times.

    Warm-up: the first WARMUP_SHARE of the reports. A Ray run's first ~15 s share the 2 cores with
    its helpers' start-up (R steps 33 ms there, 22 ms after, on `tiny`); the plain loop's first
    reports hold its allocator's and oneDNN's first passes. Both sides skip the same share.
    """
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    if len(rows) < 6:
        raise SystemExit(f"{metrics}: {len(rows)} reports, need 6 or more (raise --iterations)")
    first, last = rows[max(1, int(len(rows) * WARMUP_SHARE))], rows[-2]
    return (last["step"] - first["step"]) * images_per_step / (last["time"] - first["time"])


def plain(cfg: Config, folder: Path, threads: int | None) -> float:
    from simgan_dist.train.local import train_local

    cfg = config_from_dict(cfg.to_dict(redact=False))
    workers = cfg.train.num_workers
    cfg.train.batch_size *= workers
    cfg.train.buffer_size *= workers
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        train_local(cfg, folder, progress=False)
    finally:
        torch.set_num_threads(previous)
    return steady_rate(folder / "metrics.jsonl", cfg.train.batch_size * (cfg.train.k_g + cfg.train.k_d))


def distributed(cfg: Config, folder: Path) -> float:
    from simgan_dist.train.driver import fit

    cfg = config_from_dict(cfg.to_dict(redact=False))
    cfg.train.storage_path, cfg.train.name = str(folder.parent), folder.name
    result = fit(cfg)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    per_step = cfg.train.batch_size * (cfg.train.k_g + cfg.train.k_d) * cfg.train.num_workers
    return steady_rate(folder / "monitor" / "metrics.jsonl", per_step)


def ray_worker_threads(cfg: Config) -> int:
    """torch threads in a process holding one training worker's resources (Ray sets OMP_NUM_THREADS from them)."""
    import ray

    ray_cluster.connect()
    worker_resources = resources.training_resources(cfg)
    probe = ray.remote(lambda: torch.get_num_threads())
    return ray.get(probe.options(num_cpus=worker_resources["CPU"], num_gpus=worker_resources.get("GPU", 0)).remote())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["eye"], help="presets or YAML config files")
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2, help="ray runs per case (plain runs: one more)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="torch threads of the plain loop on CPU, one plain run each (0: as many as Ray workers)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train_local takes a GPU whenever torch sees one
    use_gpu = torch.cuda.is_available()
    os.environ.setdefault("RAY_worker_niceness", "0")  # before Ray starts: read by its raylet
    console.configure_console(verbose=False)
    import ray

    from simgan_dist.data.simulate import simulate_dataset

    fixed = [f"train.use_gpu={str(use_gpu).lower()}", f"train.iterations={args.iterations}",
             "train.pretrain_refiner_steps=0", "train.pretrain_disc_steps=0", "train.eval_every=0",
             "train.checkpoint_every=1000000000", "train.checkpoint_every_s=0"]
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per_iteration = max(c.train.batch_size * (c.train.k_g + c.train.k_d)
                            for c in (config_for(name, args.overrides) for name in args.configs))
        synthetic = max(SYNTHETIC, 4 * per_iteration * max(args.workers))
        simulate_dataset(str(folder / "data"), synthetic=synthetic, real=max(REAL, synthetic // 2), real_test=0,
                         seed=0)
        data = [f"data.synthetic={folder}/data/synthetic", f"data.real={folder}/data/real"]
        try:
            for index, name in enumerate(args.configs):
                for workers in args.workers:
                    cfg = config_for(name, [*args.overrides, *fixed, *data, f"train.num_workers={workers}"])
                    # the plain loop's thread counts on CPU (0: one per Ray worker); one run each per round
                    threads = [None] if use_gpu else list(dict.fromkeys(t or workers for t in args.threads))
                    ray_threads = ray_worker_threads(cfg)
                    rates = {"ray": [], **{t: [] for t in threads}}
                    for i in range(args.repeats + 1):  # plain (each thread count), ray, ..., plain
                        for side in threads + (["ray"] if i < args.repeats else []):
                            # (a plain run resumes from a folder that has a checkpoint: one folder per run)
                            run = folder / "runs" / f"{index}-{Path(name).stem}-{workers}-{side}-{i}"
                            if side == "ray":
                                rate = distributed(cfg, run)
                                time.sleep(SETTLE_S)
                            else:
                                rate = plain(cfg, run, side)
                            rates[side].append(rate)
                            print(json.dumps({"config": name, "workers": workers, "side": side if side == "ray" else
                                              f"plain, {side or '-'} thread(s)", "images_per_s": round(rate),
                                              "load_avg": round(os.getloadavg()[0], 1)}), flush=True)
                    r = statistics.median(rates["ray"])
                    device = torch.cuda.get_device_name() if use_gpu else "CPU"
                    for t in threads:
                        p = statistics.median(rates[t])
                        pairs = [ray / statistics.mean(rates[t][i:i + 2]) for i, ray in enumerate(rates["ray"])]
                        summary.append(
                            f"ratio {r / p:.2f} (ray/plain): {name}, batch {cfg.train.batch_size} x {workers} "
                            f"worker(s), K_g {cfg.train.k_g}, K_d {cfg.train.k_d}, {device}; plain ({t or '-'} "
                            f"thread(s), batch {cfg.train.batch_size * workers}) {p:,.0f} images/s, ray ({ray_threads} "
                            f"thread(s) per worker) {r:,.0f} images/s; pairs {', '.join(f'{x:.2f}' for x in pairs)}")
        finally:
            ray.shutdown()
    print("\n".join(summary))


if __name__ == "__main__":
    main()
