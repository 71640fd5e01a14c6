"""Rows/s of the data path: simulate → Parquet → Ray Data → uint8 batches, from local disk and loopback S3.

    DS_ACCELERATOR=cpu .venv/bin/python bench/data_throughput.py --rows 100000 --num-cpus 2

Steps: render `--rows` synthetic eyes into a local folder (simulator + writer rate),
copy the shards to a moto S3 server started as a separate process on 127.0.0.1,
then, after one warm-up pass, for each source time a full pass of `read_dataset(...).iter_batches` (numpy,
what a refinement job sees) and `iter_torch_batches` (what a training worker sees),
plus the single-process `load_numpy` reader as a baseline. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import boto3
import pyarrow.fs as pafs

from simgan_dist.config import StorageConfig
from simgan_dist.data import storage
from simgan_dist.data.schema import load_numpy, read_manifest
from simgan_dist.data.simulate import simulate_dataset


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    rows = fn()
    return rows, time.perf_counter() - start


def ray_pass(uri: str, cfg: StorageConfig | None, batch_size: int, torch_batches: bool) -> int:
    from simgan_dist.data.pipeline import read_dataset

    ds = read_dataset(uri, cfg)
    batches = (ds.iter_torch_batches(batch_size=batch_size) if torch_batches
               else ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    return sum(len(b["image"]) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rows-per-shard", type=int, default=25_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    workdir = tempfile.mkdtemp(prefix="simgan_bench_")
    moto, endpoint = start_moto()
    results: list[tuple[str, int, float]] = []
    try:
        local = os.path.join(workdir, "eyes")
        n, seconds = timed(lambda: sum(simulate_dataset(local, args.rows, 0, 0, rows_per_shard=args.rows_per_shard,
                                                        parallel=args.rows > args.rows_per_shard).values()))
        results.append(("simulate + write shards (Ray tasks, local disk)", n, seconds))

        cfg = StorageConfig(endpoint_url=endpoint, region="us-east-1", access_key_id="bench",
                            secret_access_key="bench")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="bench")
        fs = storage.s3_filesystem(cfg)
        s3 = "s3://bench/eyes/synthetic"
        pafs.copy_files(os.path.join(local, "synthetic"), "bench/eyes/synthetic",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        assert read_manifest(s3, cfg).rows == args.rows

        ray_pass(os.path.join(local, "synthetic"), None, args.batch_size, True)  # warm up Ray's workers
        for name, uri, source_cfg in (("local disk", os.path.join(local, "synthetic"), None),
                                      ("loopback S3 (moto)", s3, cfg)):
            results.append((f"load_numpy, one process, {name}",
                            *timed(lambda u=uri, c=source_cfg: len(load_numpy(u, c, columns=["image"])["image"]))))
            for torch_batches in (False, True):
                kind = "iter_torch_batches" if torch_batches else "iter_batches (numpy)"
                results.append((f"Ray Data {kind}, {name}", *timed(
                    lambda u=uri, c=source_cfg, t=torch_batches: ray_pass(u, c, args.batch_size, t))))
    finally:
        moto.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
        ray.shutdown()

    image_mb = 35 * 55 / 1e6
    print(f"\nrows={args.rows} rows_per_shard={args.rows_per_shard} batch_size={args.batch_size} "
          f"num_cpus={args.num_cpus} (host has {os.cpu_count()} cores)\n")
    print("| step | rows | seconds | rows/s | MB/s (uint8 images) |")
    print("|---|---:|---:|---:|---:|")
    for name, rows, seconds in results:
        print(f"| {name} | {rows} | {seconds:.2f} | {rows / seconds:,.0f} | {rows * image_mb / seconds:,.1f} |")


if __name__ == "__main__":
    main()
