"""The batch refinement job: refine a whole labeled corpus into object storage, exactly once.

    simgan-dist refine --checkpoint URI --input URI --out URI

Everything that can be wrong with the arguments (checkpoint, input dataset, output
prefix) is checked before the first byte is written. Then the output prefix gets
`refine_job.json`, the identity of the job (checkpoint weights, input manifest,
shard size); a rerun with other weights or another input into the same prefix is
refused instead of mixing two refinements.

Work is cut into shard tasks: output shard k (`part-0000k.parquet`) holds input rows
[start, stop) of one input shard, at most `refine.rows_per_shard` of them. The tasks run on
an autoscaling pool of `RefinerActor`s (`refine_pool.py`: `refine.min_actors`..`refine.max_actors`,
each with `refine.num_gpus` GPUs — explicit, so a cluster whose GPU nodes are scaled to
zero scales them up rather than refining on CPUs). What one task does (sizes, refining,
writing, verifying) is `refine_shards.py`. Several tasks are in flight per actor, two
running, so one's read/encode/upload hides behind the other's forward passes.

The output shards themselves are the job's checkpoint, with no second record that
could disagree with them: a shard is either complete or absent, its name says which
input rows it holds, and its actor verified it against its input rows. A shard task
that Ray retries overwrites the same name, so no row can be written twice. (Ray Data's
`write_parquet` names files by block and would need its separate id-checkpoint store to
resume; this contract wants deterministic, checksummed shards.) The driver only lists
the output once at the end: every shard present with the size its actor verified.

The result is recorded in the manifest (`extra.refine.exactness`); `_manifest.json` is
written last and is what makes the output a dataset.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from simgan_dist.config import Config, ModelConfig, load_config
from simgan_dist.core.models import Refiner
from simgan_dist.data import storage
from simgan_dist.data.roles import check_kind
from simgan_dist.data.schema import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    DatasetError,
    Manifest,
    ShardInfo,
    manifest_sha256,
    read_manifest,
    validate,
)
from simgan_dist.data.storage import StorageError
from simgan_dist.data.writer import make_manifest, write_manifest
from simgan_dist.refine_shards import RefineError, ShardIo, ShardTask, refine_sizes
from simgan_dist.train.checkpoint import REFINER_FILE, CheckpointError, load_refiner

JOB_FILE = "_refine_job.json"
LEGACY_JOB_FILE = "refine_job.json"  # before the `_` convention; still honoured
JOB_FORMAT = "simgan_dist.refine_job"
# What makes two runs the same job; the URIs are recorded too but a copied checkpoint
# or dataset with identical bytes is the same job.
JOB_IDENTITY = ("checkpoint_sha256", "input_manifest_sha256", "rows_per_shard")


# ---------------------------------------------------------------------------------------------
# Planning: everything is checked here, before anything is written


@dataclass
class RefineJob:
    """A validated job: what the driver plans with and ships to the actors."""

    out_uri: str
    cfg: Config
    model_cfg: ModelConfig
    weights: dict[str, torch.Tensor]
    input_manifest: Manifest
    spec: dict[str, Any]
    io: ShardIo
    tasks: list[ShardTask]
    batch_size: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plan_shards(input_uri: str, manifest: Manifest, rows_per_shard: int) -> list[ShardTask]:
    """Cut every input shard into row ranges of at most `rows_per_shard`, numbered in input order."""
    tasks: list[ShardTask] = []
    for shard in manifest.shards:
        for start in range(0, shard.rows, rows_per_shard):
            tasks.append(ShardTask(len(tasks), storage.join(input_uri, shard.path), start,
                                   min(start + rows_per_shard, shard.rows), shard.bytes, shard.sha256))
    return tasks


def _load_checkpoint(uri: str, cfg: Config) -> tuple[Refiner, Config, str]:
    try:
        refiner, ckpt_cfg = load_refiner(uri, cfg.storage)
        weights_sha = _sha256(storage.read_bytes(storage.join(uri, REFINER_FILE), cfg.storage))
    except (CheckpointError, StorageError) as exc:
        raise RefineError(f"checkpoint {uri} cannot be used: {exc}") from exc
    return refiner, ckpt_cfg, weights_sha


def _load_input(uri: str, cfg: Config, model: ModelConfig) -> tuple[Manifest, str]:
    try:
        manifest = validate(uri, cfg.storage)
        manifest_sha = manifest_sha256(uri, cfg.storage)
    except (DatasetError, StorageError) as exc:
        raise RefineError(f"input {uri} is not a dataset in the simgan_dist contract: {exc}") from exc
    try:
        check_kind("refine --input", uri, manifest.kind)
    except DatasetError as exc:
        raise RefineError(str(exc)) from None
    want = [model.image_height, model.image_width, model.image_channels]
    if list(manifest.image_shape) != want:
        raise RefineError(f"input {uri} holds {'x'.join(map(str, manifest.image_shape))} (HxWxC) images but the "
                          f"checkpoint's refiner was trained on {'x'.join(map(str, want))}")
    return manifest, manifest_sha


def _check_output(out_uri: str, input_uri: str, cfg: Config, spec: dict[str, Any]) -> bool:
    """Refuse an output prefix that holds anything but this job's own work; True if it is already complete."""
    try:
        if storage.location(out_uri, cfg.storage) == storage.location(input_uri, cfg.storage):
            raise RefineError(f"--out {out_uri} is the input dataset itself: choose another prefix")
        # Nested prefixes mix datasets for plain readers, which read a prefix's subfolders too.
        if storage.is_within(out_uri, input_uri, cfg.storage) or storage.is_within(input_uri, out_uri, cfg.storage):
            raise RefineError(f"--out {out_uri} is inside or above the input dataset {input_uri}: "
                              "choose a prefix beside it")
        storage.check_bucket(out_uri, cfg.storage)
        names = storage.list_files(out_uri, cfg.storage)
        job_file = next((n for n in (JOB_FILE, LEGACY_JOB_FILE) if n in names), None)
        recorded = json.loads(storage.read_bytes(storage.join(out_uri, job_file), cfg.storage)) if job_file else None
    except StorageError as exc:
        raise RefineError(f"output {out_uri} is not usable: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise RefineError(f"{storage.join(out_uri, job_file)} is not valid JSON ({exc}); "
                          "delete the output prefix to start over") from exc
    if recorded is None:
        foreign = [n for n in names if n in (MANIFEST_NAME, LEGACY_MANIFEST_NAME) or n.endswith(".parquet")]
        if foreign:
            raise RefineError(f"output {out_uri} already holds files that no refine job wrote ({foreign[:3]}...): "
                              "choose an empty prefix")
        return False
    changed = [f"{key}: {recorded.get(key)!r} there, {spec[key]!r} now" for key in JOB_IDENTITY
               if recorded.get(key) != spec[key]]
    if recorded.get("format") != JOB_FORMAT or changed:
        raise RefineError(f"output {out_uri} belongs to another refine job ({'; '.join(changed) or 'unknown format'}; "
                          f"checkpoint {recorded.get('checkpoint')}, input {recorded.get('input')}): "
                          "refusing to mix outputs; choose another --out or delete that prefix")
    return MANIFEST_NAME in names or LEGACY_MANIFEST_NAME in names


def plan_job(checkpoint: str, input_uri: str, out_uri: str, cfg: Config) -> tuple[RefineJob, bool]:
    """Validate the checkpoint, the input and the output prefix; writes nothing.

    Returns the job and whether its output is already complete (a finished rerun).
    """
    for key in ("min_actors", "max_actors"):
        if getattr(cfg.refine, key) < 1:
            raise RefineError(f"refine.{key} must be >= 1, got {getattr(cfg.refine, key)}")
    refiner, ckpt_cfg, weights_sha = _load_checkpoint(checkpoint, cfg)
    manifest, manifest_sha = _load_input(input_uri, cfg, ckpt_cfg.model)
    batch_size, rows_per_shard = refine_sizes(ckpt_cfg.model, manifest.layout, cfg.refine)
    spec = {
        "format": JOB_FORMAT,
        "checkpoint": checkpoint,
        "checkpoint_sha256": weights_sha,
        "input": input_uri,
        "input_manifest_sha256": manifest_sha,
        "rows_per_shard": rows_per_shard,
    }
    complete = _check_output(out_uri, input_uri, cfg, spec)
    job = RefineJob(
        out_uri=out_uri, cfg=cfg, model_cfg=ckpt_cfg.model,
        weights=refiner.state_dict(), input_manifest=manifest, spec=spec,
        io=ShardIo(out_uri, manifest.layout, storage.effective_config(cfg.storage)),
        tasks=plan_shards(input_uri, manifest, rows_per_shard), batch_size=batch_size,
    )
    return job, complete


# ---------------------------------------------------------------------------------------------
# The driver


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True, smoothing=0.1,
                disable=not enabled, file=sys.stdout)


def _output_sizes(job: RefineJob) -> dict[str, int]:
    """One listing of the output prefix: shard name → size in bytes."""
    fs, base = storage.resolve(job.out_uri, job.cfg.storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError as exc:
        raise storage.explain(exc, job.out_uri, "list") from exc
    return {info.base_name: info.size for info in infos if info.type == pafs.FileType.File}


def _run_tasks(job: RefineJob, present: dict[str, int], progress: bool
               ) -> tuple[dict[int, ShardInfo], dict[int, str], int, dict[str, Any]]:
    """Every shard task on the actor pool; returns the verified ShardInfos, the errors of the shards
    that failed, how many were kept from an earlier run, and the stage's speed."""
    import ray

    from simgan_dist.refine_pool import TASKS_RUNNING_PER_ACTOR, run_shard_tasks

    cfg = job.cfg.refine
    stats: dict[str, Any] = {"actors": f"{cfg.min_actors}-{cfg.max_actors}", "num_gpus": cfg.num_gpus,
                             "precision": "bf16" if cfg.num_gpus and job.io.layout.image_dtype == "uint8" else "fp32",
                             "batch_size": job.batch_size}
    if cfg.num_gpus and not ray.cluster_resources().get("GPU"):
        print(f"refine: no GPU in the cluster yet; the actors wait for the autoscaler to add nodes with "
              f"{cfg.num_gpus} GPU(s) each (refine.num_gpus=0 refines on CPUs)", file=sys.stderr)
    infos, failed, finished_at, reused = {}, {}, [], 0
    started = time.perf_counter()
    desc = f"refine ({stats['actors']} actors, {stats['precision']})"
    with _progress(sum(t.rows for t in job.tasks), 0, desc, progress) as bar:
        for task, info, was_kept, error in run_shard_tasks(job, [(t, t.name in present) for t in job.tasks]):
            if error:
                failed[task.index] = error
                continue
            infos[task.index] = info
            if was_kept:
                reused += 1
            else:
                finished_at.append((time.perf_counter(), info.rows))
            bar.update(info.rows)
    stats["rows_refined"] = sum(n for _, n in finished_at)
    if finished_at:
        stats["seconds"] = round(finished_at[-1][0] - started, 3)
        stats["images_per_s"] = round(sum(n for _, n in finished_at) / max(stats["seconds"], 1e-9))
        # The rate a long job runs at: counted once the first wave of shards (started together,
        # slowed by actor start-up) is out, from then to the last shard.
        wave = cfg.min_actors * TASKS_RUNNING_PER_ACTOR
        if len(finished_at) > wave:
            span = finished_at[-1][0] - finished_at[wave - 1][0]
            stats["steady_images_per_s"] = round(sum(n for _, n in finished_at[wave:]) / max(span, 1e-9))
    return infos, failed, reused, stats


def refine(checkpoint: str, input_uri: str, out_uri: str, cfg: Config, progress: bool = True) -> Manifest:
    """Refine every row of `input_uri` with the checkpoint's refiner into `out_uri`, exactly once.

    Safe to rerun with the same arguments after a crash: finished shards are verified
    and kept, the rest are refined. Returns the manifest of the complete output.
    """
    job, complete = plan_job(checkpoint, input_uri, out_uri, cfg)
    if complete:
        print(f"refine: {out_uri} is already complete (its manifest was written by this job)")
        return read_manifest(out_uri, cfg.storage)
    from simgan_dist.ray_cluster import connect, require_shared_storage

    connect()  # before the job file: a refused job leaves nothing behind
    require_shared_storage({"refine --input": input_uri, "refine --out": out_uri}, "refine")
    storage.write_bytes_atomic(storage.join(out_uri, JOB_FILE), (json.dumps(job.spec, indent=2) + "\n").encode(),
                               cfg.storage)
    infos, failed, reused, stats = _run_tasks(job, _output_sizes(job), progress)

    # The actors verified every shard; one listing confirms each is still there, as verified.
    sizes = _output_sizes(job)
    problems = [f"{t.name}: {failed.get(t.index, 'never written')}" for t in job.tasks if t.index not in infos]
    problems += [f"{t.name}: {sizes.get(t.name, 'no')} bytes now, {infos[t.index].bytes} when verified (replaced?)"
                 for t in job.tasks if t.index in infos and sizes.get(t.name) != infos[t.index].bytes]
    rows = sum(info.rows for info in infos.values())
    if problems or rows != job.input_manifest.rows:
        raise RefineError(f"{out_uri} is not an exact refinement of {input_uri} ({len(problems)} bad shard(s): "
                          f"{'; '.join(problems[:5])}); no manifest written. Rerun the same command to redo them")
    shards = [infos[t.index] for t in job.tasks]
    extra = {"refine": {
        **job.spec,
        "shards_reused": reused,
        "shards_refined": len(job.tasks) - reused,
        **stats,
        "exactness": {
            "verified": True,
            "rows": rows,
            "input_rows": job.input_manifest.rows,
            "shards": len(shards),
            "ids": "equal to the input's, in input order",
            "labels": "bit-identical to the input's",
            "by": "each actor, reading every shard back after writing it (kept shards: sha256 too)",
            "inputs": "each input shard's size and sha256 checked against the input manifest as it was read",
            "checked": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }}
    manifest = make_manifest(job.io.layout, shards, kind="refined", source="refine", extra=extra)
    write_manifest(out_uri, manifest, cfg.storage)
    refined_rows = stats["rows_refined"]
    speed = f" in {stats['seconds']:.1f} s ({stats['images_per_s']:,} images/s)" if "seconds" in stats else ""
    print(f"refine: {refined_rows} of {rows} rows refined into {out_uri}{speed}, {reused} shard(s) kept from an "
          "earlier run; ids and labels verified exact")
    return manifest


def choose_checkpoint(uri: str, cfg: Config) -> str:
    """A checkpoint folder as given, or the best one by the label-free objective under a run or sweep folder."""
    from simgan_dist.metrics.objective import best_checkpoint
    from simgan_dist.train.checkpoint import CONFIG_FILE

    filesystem, path = storage.resolve(uri, cfg.storage)
    if storage.file_info(filesystem, f"{path}/{CONFIG_FILE}", storage.join(uri, CONFIG_FILE)).type \
            == pafs.FileType.File:
        return uri
    found = best_checkpoint(uri, cfg.storage)
    if found is None:
        raise RefineError(f"--checkpoint {uri}: neither a checkpoint folder (no {CONFIG_FILE}) nor a run or sweep "
                          "folder with scored checkpoints (train with train.eval_every > 0)")
    chosen, scores = found
    detail = (f"objective {scores['objective']:.4g} at step {scores['step']} (realism {scores['realism']:.4g}, "
              f"drift {scores['drift']:.3g} px)" if "objective" in scores else f"from {scores['source']}")
    print(f"refine: best checkpoint of {uri}: {chosen}, {detail}", flush=True)
    return chosen


def cli_refine(args: argparse.Namespace) -> int:
    from simgan_dist import tracking

    cfg = load_config(args.preset, args.config, args.overrides)
    checkpoint = choose_checkpoint(args.checkpoint, cfg)
    with tracking.stage_run(cfg, "refine", checkpoint, {"input": args.input}) as run:
        refine(checkpoint, args.input, args.out, cfg)
        run.tags(tracking.dataset_tags({"output": args.out}, cfg.storage))
    return 0
