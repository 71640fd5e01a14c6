"""Refine job throughput, end to end (read → refine → write), next to the plain-PyTorch refiner.

    python bench/refine_throughput.py --preset eye --rows 2000000          # one GPU (bf16, channels-last)
    python bench/refine_throughput.py --preset eye --rows 2000000 --compile
    python bench/refine_throughput.py --preset tiny --rows 1200000 --repeats 2 \
        --set refine.min_actors=2 --set refine.max_actors=2                 # CPU (fp32), 2 actors

Same model (the preset's refiner, random weights), precision and batch size for all rows:

  forward      model(x) on normalised input already on the device: the §6 roofline's
               definition (116K images/s for the eye refiner on one H100, bf16 channels-last)
  plain loop   `BatchRefiner` on host uint8 arrays, one process: upload, normalise,
               forward, quantise, download; what the job's actors run per batch. On CPU
               also as one single-thread process per actor, side by side (the actors run
               one thread each); the job is compared with the better of the two ("best plain")
  end to end   `refine()`: Parquet shards in → the actor pool (one GPU per actor) →
               Parquet shards out, plus validation, verification and the manifest.
               `steady` counts once the first wave of shards is out (actors started);
               `wall` is the whole command, start-up and exactness checks included.

The input corpus is random uint8 images with gaze labels, written in the data contract
under --root (a local temp folder by default; an s3:// prefix measures object storage),
in input shards as simulate writes them (--input-rows-per-shard). Each of --repeats jobs is
followed by the plain baselines, and compared with them and the ones before it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import tempfile
import time

import numpy as np
import torch

from simgan_dist.config import load_config
from simgan_dist.core.imaging import to_model_input
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.data import storage
from simgan_dist.data.schema import Layout
from simgan_dist.data.writer import DatasetWriter
from simgan_dist.refine import refine
from simgan_dist.refine_shards import BatchRefiner, refine_sizes
from simgan_dist.train.checkpoint import write_checkpoint

WRITE_CHUNK = 65536


def write_corpus(uri: str, rows: int, layout: Layout, rows_per_shard: int) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(uri, layout, kind="synthetic", source="bench", rows_per_shard=rows_per_shard,
                       overwrite=True) as writer:
        for start in range(0, rows, WRITE_CHUNK):
            n = min(WRITE_CHUNK, rows - start)
            gaze = rng.normal(size=(n, 3)).astype(np.float32)
            writer.write({"id": np.array([f"bench-{i:09d}" for i in range(start, start + n)], dtype=object),
                          "image": rng.integers(0, 256, (n, *layout.image_shape), dtype=np.uint8),
                          "gaze": gaze / np.linalg.norm(gaze, axis=1, keepdims=True)})


def timed_rate(step, images_per_step: int, seconds: float, sync) -> float:
    """Images/s of `step()` repeated for about `seconds`, after one warm-up call."""
    step()
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        calls += 1
    sync()
    return calls * images_per_step / (time.perf_counter() - start)


def plain_pytorch(refiner: BatchRefiner, shape: tuple[int, ...], batches: int, seconds: float) -> dict[str, float]:
    sync = torch.cuda.synchronize if refiner.device.type == "cuda" else (lambda: None)
    host = np.random.default_rng(1).integers(0, 256, (batches * refiner.batch_size, *shape), dtype=np.uint8)
    x = to_model_input(host[:refiner.batch_size], refiner.device, refiner.dtype, refiner.channels_last)
    with torch.inference_mode():
        forward = timed_rate(lambda: refiner.model(x), refiner.batch_size, seconds, sync)
    loop = timed_rate(lambda: refiner(host), len(host), seconds, sync)
    return {"forward": forward, "plain_loop": loop}


def _one_thread_loop(model_cfg, weights, batch_size: int, shape: tuple[int, ...], seconds: float, start_at: float,
                     rates) -> None:
    torch.set_num_threads(1)
    model = build_refiner(model_cfg)
    model.load_state_dict(weights)
    refiner = BatchRefiner(model, batch_size, device="cpu")
    host = np.random.default_rng(1).integers(0, 256, (4 * batch_size, *shape), dtype=np.uint8)
    refiner(host)
    time.sleep(max(0.0, start_at - time.time()))
    rates.put(timed_rate(lambda: refiner(host), len(host), seconds, lambda: None))


def plain_processes(model, model_cfg, batch_size: int, shape: tuple[int, ...], seconds: float, processes: int) -> float:
    """The job's work without Ray on CPU: `processes` plain loops of one thread each, side by side (as the
    actors run), started together; their images/s summed."""
    context = multiprocessing.get_context("spawn")
    rates = context.Queue()
    start_at = time.time() + 15  # after every process has imported torch and warmed up
    workers = [context.Process(target=_one_thread_loop, args=(model_cfg, model.state_dict(), batch_size, shape,
                                                              seconds, start_at, rates)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    total = sum(rates.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total


def plain_baselines(refiner: BatchRefiner, model_cfg, shape: tuple[int, ...], seconds: float, cpu_actors: int
                    ) -> dict[str, float]:
    """The plain loop on a GPU; on CPU, once with as many torch threads as the job has actors and once as
    one single-thread process per actor, side by side: the job is held to the better."""
    if not cpu_actors:
        return plain_pytorch(refiner, shape, batches=4, seconds=seconds)
    torch.set_num_threads(cpu_actors)
    rates = plain_pytorch(refiner, shape, batches=4, seconds=seconds)
    side_by_side = plain_processes(refiner.model, model_cfg, refiner.batch_size, shape, seconds, cpu_actors)
    return {**rates, f"plain_loop_{cpu_actors}_processes": side_by_side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="eye", help="config preset whose refiner and refine.* settings are used")
    parser.add_argument("--rows", type=int, default=200_000, help="images in the corpus")
    parser.add_argument("--root", help="where the corpus and its refined copy go (default: a temp folder)")
    parser.add_argument("--input-rows-per-shard", type=int, default=50_000, metavar="R",
                        help="rows per input shard (default: what simulate and ingest write); the job cuts each "
                        "into tasks of refine.rows_per_shard rows")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each plain-PyTorch measurement")
    parser.add_argument("--repeats", type=int, default=1, help="jobs, each followed by the plain baselines")
    parser.add_argument("--compile", action="store_true", help="torch.compile the refiner (job and baselines)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set refine.batch_size=8192")
    args = parser.parse_args()

    cfg = load_config(args.preset, overrides=[*args.overrides, f"refine.compile={str(args.compile).lower()}"])
    gpus = torch.cuda.device_count()
    if gpus:
        cfg.refine.num_gpus = cfg.refine.num_gpus or 1
        cfg.refine.max_actors = min(cfg.refine.max_actors, gpus)
        cfg.refine.min_actors = min(cfg.refine.min_actors, cfg.refine.max_actors)
    root = args.root or tempfile.mkdtemp(prefix="refine_bench_")
    layout = Layout((cfg.model.image_height, cfg.model.image_width, cfg.model.image_channels), "uint8",
                    {"gaze": (3,)})
    cfg.refine.batch_size, cfg.refine.rows_per_shard = refine_sizes(cfg.model, layout, cfg.refine)
    torch.manual_seed(0)
    model = build_refiner(cfg.model)
    checkpoint = write_checkpoint(os.path.join(tempfile.mkdtemp(prefix="refine_ckpt_"), "ckpt"), cfg, model,
                                  build_discriminator(cfg.model))
    data, out = storage.join(root, "input"), storage.join(root, f"refined-{int(time.time())}")
    start = time.perf_counter()
    write_corpus(data, args.rows, layout, args.input_rows_per_shard)
    print(f"corpus: {args.rows} rows in {time.perf_counter() - start:.1f} s at {data}")

    device = torch.cuda.get_device_name(0) if gpus else f"CPU ({platform.processor() or 'x86'}, {os.cpu_count()} cores)"
    baseline = BatchRefiner(model, cfg.refine.batch_size, compile=args.compile)
    runs, cpu_actors = [], 0 if gpus else cfg.refine.max_actors
    before = plain_baselines(baseline, cfg.model, layout.image_shape, args.seconds, cpu_actors)
    for repeat in range(args.repeats):
        start = time.perf_counter()
        manifest = refine(str(checkpoint), data, f"{out}-{repeat}", cfg)
        wall = time.perf_counter() - start
        # Measured on both sides of each job, the better one kept: the machine's speed moves in between.
        after = plain_baselines(baseline, cfg.model, layout.image_shape, args.seconds, cpu_actors)
        plain = {key: max(before[key], after[key]) for key in before}
        record = manifest.extra["refine"]
        run = {"plain": {key: round(value) for key, value in plain.items()},
               "e2e_steady": record.get("steady_images_per_s", 0), "e2e_stage": record["images_per_s"],
               "e2e_wall": round(args.rows / wall)}
        best_plain = max(value for key, value in plain.items() if key != "forward")
        run.update({f"{key}_vs_best_plain": round(run[key] / best_plain, 3) for key in ("e2e_stage", "e2e_wall")})
        runs.append(run)
        print(json.dumps(run), flush=True)
        before = after
    result = {"device": device, "preset": args.preset, "rows": args.rows, "batch_size": cfg.refine.batch_size,
              "rows_per_shard": cfg.refine.rows_per_shard, "input_rows_per_shard": args.input_rows_per_shard,
              "actors": record["actors"], "precision": record["precision"], "compile": args.compile, "runs": runs}
    print(json.dumps(result, indent=2))
    for run in runs:
        print(f"| {device} | {args.preset} | {args.rows} | {record['precision']} | {cfg.refine.batch_size} | "
              + " | ".join(f"{run['plain'][key]:,}" for key in run["plain"])
              + f" | {run['e2e_stage']:,} | {run['e2e_wall']:,} | {run['e2e_wall_vs_best_plain']:.2f} |")
    if gpus:
        steady = max(run["e2e_steady"] for run in runs)
        print(f"H100 roofline 116,000 images/s: end to end steady = {steady / 116_000:.0%} of it "
              f"(goal >= 80%); {math.ceil(1.2e6 / max(steady, 1))} s for the 1.2M UnityEyes corpus")

if __name__ == "__main__":
    main()
