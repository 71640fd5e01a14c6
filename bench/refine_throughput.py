"""Refine job throughput, end to end (read → refine → write), next to the plain-PyTorch refiner.

    python bench/refine_throughput.py --preset eye --rows 2000000          # one GPU (bf16, channels-last)
    python bench/refine_throughput.py --preset eye --rows 2000000 --compile
    python bench/refine_throughput.py --preset eye --rows 4000 --seconds 10 # CPU (fp32)

Same model (the preset's refiner, random weights), precision and batch size for all rows:

  forward      model(x) on normalised input already on the device: the §6 roofline's
               definition (116K images/s for the eye refiner on one H100, bf16 channels-last)
  plain loop   `BatchRefiner` on host uint8 arrays, one process: upload, normalise,
               forward, quantise, download; what the job's actors run per batch
  end to end   `refine()`: Parquet shards in → Ray Data actor pool (one GPU per actor) →
               Parquet shards out, plus validation, verification and the manifest.
               `steady` counts once the first wave of shards is out (actors started);
               `wall` is the whole command, start-up and exactness checks included.

The input corpus is random uint8 images with gaze labels, written in the data contract
under --root (a local temp folder by default; an s3:// prefix measures object storage).
"""

from __future__ import annotations

import argparse
import json
import math
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="eye", help="config preset whose refiner and refine.* settings are used")
    parser.add_argument("--rows", type=int, default=200_000, help="images in the corpus")
    parser.add_argument("--root", help="where the corpus and its refined copy go (default: a temp folder)")
    parser.add_argument("--input-rows-per-shard", type=int, default=50_000, metavar="R",
                        help="rows per input shard (default: what simulate and ingest write); the job cuts each "
                        "into tasks of refine.rows_per_shard rows")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each plain-PyTorch measurement")
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

    if not gpus:
        torch.set_num_threads(cfg.refine.max_actors)  # the job's actors run one thread each
    baseline = BatchRefiner(model, cfg.refine.batch_size, compile=args.compile)
    before = plain_pytorch(baseline, layout.image_shape, batches=4, seconds=args.seconds)
    start = time.perf_counter()
    manifest = refine(str(checkpoint), data, out, cfg)
    wall = time.perf_counter() - start
    # Measured on both sides of the job, the better one kept: a shared machine's load moves in between.
    after = plain_pytorch(baseline, layout.image_shape, batches=4, seconds=args.seconds)
    plain = {key: max(before[key], after[key]) for key in before}
    record = manifest.extra["refine"]
    result = {
        "device": torch.cuda.get_device_name(0) if gpus else f"CPU ({platform.processor() or 'x86'}, "
                                                             f"{os.cpu_count()} cores)",
        "preset": args.preset, "rows": args.rows, "batch_size": cfg.refine.batch_size,
        "rows_per_shard": cfg.refine.rows_per_shard, "actors": record["actors"], "precision": record["precision"],
        "compile": args.compile, "torch_threads": torch.get_num_threads(),
        "forward": round(plain["forward"]), "plain_loop": round(plain["plain_loop"]),
        "plain_runs": [{key: round(value) for key, value in run.items()} for run in (before, after)],
        "e2e_steady": record.get("steady_images_per_s", 0), "e2e_stage": record["images_per_s"],
        "e2e_wall": round(args.rows / wall),
    }
    for key in ("e2e_steady", "e2e_stage", "e2e_wall"):
        result[f"{key}_vs_forward"] = round(result[key] / result["forward"], 3)
        result[f"{key}_vs_plain_loop"] = round(result[key] / result["plain_loop"], 3)
    print(json.dumps(result, indent=2))
    print(f"| {result['device']} | {args.preset} | {args.rows} | {record['precision']} | {cfg.refine.batch_size} | "
          f"{result['forward']:,} | {result['plain_loop']:,} | {result['e2e_steady']:,} "
          f"({result['e2e_steady_vs_forward']:.0%}) | {result['e2e_wall']:,} ({result['e2e_wall_vs_forward']:.0%}) |")
    if gpus:
        print(f"H100 roofline 116,000 images/s: end to end steady = {result['e2e_steady'] / 116_000:.0%} of it "
              f"(goal >= 80%); {math.ceil(1.2e6 / max(result['e2e_steady'], 1))} s for the 1.2M UnityEyes corpus")


if __name__ == "__main__":
    main()
