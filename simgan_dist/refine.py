"""The batch refinement job: refine a whole labeled corpus into object storage, exactly once.

    simgan-dist refine --checkpoint URI --input URI --out URI

Everything that can be wrong with the arguments (checkpoint, input dataset, output
prefix) is checked before the first byte is written. Then the output prefix gets
`refine_job.json`, the identity of the job (checkpoint weights, input manifest,
shard size); a rerun with other weights or another input into the same prefix is
refused instead of mixing two refinements.

Work is cut into shard tasks: output shard k (`part-0000k.parquet`) holds input rows
[start, stop) of one input shard, at most `refine.rows_per_shard` of them. Sizes come
from the image size in bytes, not a fixed row count (`refine_sizes`): a batch's
activations fit `refine.batch_memory_gb` (eye: ~4,000 images, hand: ~80), a task holds
`refine.task_mb` of input images. Ray Data runs the tasks on an autoscaling pool of
`RefinerActor`s (`refine.min_actors`..`refine.max_actors`, each with `refine.num_gpus`
GPUs — explicit, so a cluster whose GPU nodes are scaled to zero scales them up rather
than refining on CPUs): an actor reads its input rows, refines them in batches (uint8
shipped to the device and normalised there; bf16 and channels-last on GPU, depth fp32;
optional torch.compile) and writes the shard atomically (one PUT, or a rename). `id`,
labels and `source` are passed through as Arrow columns, never decoded, so they stay
bit-identical. Several tasks are in flight per actor, two running, so one's
read/encode/upload hides behind the other's forward passes.

The output shards themselves are the job's checkpoint, with no second record that
could disagree with them: a shard is either complete or absent, its name says which
input rows it holds. Verification happens in the actors, beside the data they already
hold: after writing a shard an actor reads it back (footer, ids, labels) and compares it
with its input rows; a shard an earlier run left is checked the same way, plus its
sha256, and kept or redone. A shard task that Ray retries overwrites the same name, so
no row can be written twice. (Ray Data's `write_parquet` names files by block and would
need its separate id-checkpoint store to resume; this contract wants deterministic,
checksummed shards.) The driver only lists the output once at the end: every shard
present with the size its actor verified.

The result is recorded in the manifest (`extra.refine.exactness`); `_manifest.json` is
written last and is what makes the output a dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from simgan_dist.config import Config, ModelConfig, RefineConfig, StorageConfig, load_config
from simgan_dist.core.imaging import normalize, to_storage
from simgan_dist.core.models import Refiner, build_refiner
from simgan_dist.data import storage
from simgan_dist.data.schema import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    DatasetError,
    Layout,
    Manifest,
    ShardInfo,
    encode_shard,
    images_from_binary,
    labels_from_list,
    make_manifest,
    read_manifest,
    read_manifest_bytes,
    shard_name,
    validate,
    write_manifest,
)
from simgan_dist.data.storage import StorageError
from simgan_dist.errors import UserError
from simgan_dist.train.checkpoint import REFINER_FILE, CheckpointError, load_refiner

JOB_FILE = "_refine_job.json"
LEGACY_JOB_FILE = "refine_job.json"  # before the `_` convention; still honoured
JOB_FORMAT = "simgan_dist.refine_job"
# What makes two runs the same job; the URIs are recorded too but a copied checkpoint
# or dataset with identical bytes is the same job.
JOB_IDENTITY = ("checkpoint_sha256", "input_manifest_sha256", "rows_per_shard")
# Shard tasks running at once in one actor (while one waits on storage, the other computes),
# and queued per actor so the next starts without a round trip to the scheduler.
TASKS_RUNNING_PER_ACTOR = 2
TASKS_IN_FLIGHT_PER_ACTOR = 4
# Live activation maps of the refiner's width per image during a forward pass
# (a residual block's input, its two convolutions, the sum), measured within ~2x.
LIVE_ACTIVATIONS = 4


class RefineError(UserError, RuntimeError):
    """The refine job cannot start or its output is not exact; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The refiner as a numpy → numpy function (Ray-free: the benchmark's plain-PyTorch baseline too)


class BatchRefiner:
    """N×H×W×C uint8/uint16 images → refined images of the same shape and dtype.

    On GPU: bf16 weights and activations for 8-bit images (depth: fp32 weights and inputs,
    TF32 convolutions, so millimetres are not quantised), channels-last, normalisation on
    the device, optional torch.compile (tail batches are padded so it compiles one shape only).
    On CPU: fp32, the same arithmetic as `to_model_input` → model → `to_storage`.
    Thread-safe: while one caller runs the model, the others do their I/O and host work.
    """

    def __init__(self, refiner: Refiner, batch_size: int, device: str | torch.device | None = None,
                 compile: bool = False, depth: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if on_gpu and not depth else torch.float32
        self.channels_last = on_gpu
        self.batch_size = batch_size
        model = refiner.to(self.device, self.dtype).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.pad = compile
        self.model = torch.compile(model, dynamic=False) if compile else model
        self.lock = threading.Lock()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = np.empty_like(images)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = len(chunk)
            if self.pad and n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            with self.lock:  # one forward at a time; the download and cast below overlap the next one
                x, centres = normalize(chunk, self.device, self.dtype, self.channels_last)
                y = self.model(x)
            out[start:start + n] = to_storage(y[:n], images.dtype, None if centres is None else centres[:n])
        return out


def refine_sizes(model: ModelConfig, layout: Layout, refine_cfg: RefineConfig) -> tuple[int, int]:
    """(images per forward pass, rows per shard task) from the image size in bytes.

    A batch's activations — `LIVE_ACTIVATIONS` maps of `refiner_channels` × H × W, bf16 on
    GPU for 8-bit images and fp32 otherwise — fit `batch_memory_gb`; a task holds about
    `task_mb` of input images and a whole number of batches. Set values win.
    """
    h, w = layout.image_shape[:2]
    element = 2 if refine_cfg.num_gpus and layout.image_dtype == "uint8" else 4
    per_image = LIVE_ACTIVATIONS * model.refiner_channels * h * w * element
    batch = refine_cfg.batch_size or max(1, int(refine_cfg.batch_memory_gb * 2**30 // per_image))
    if not refine_cfg.batch_size and batch >= 64:
        batch -= batch % 32  # tensor-core friendly
    rows = refine_cfg.rows_per_shard or max(batch, int(refine_cfg.task_mb * 2**20 // layout.image_nbytes)
                                            // batch * batch)
    return batch, rows


# ---------------------------------------------------------------------------------------------
# Planning: everything is checked here, before anything is written


@dataclass(frozen=True)
class ShardTask:
    """Output shard `index` = rows [start, stop) of the input shard at `input_uri`."""

    index: int
    input_uri: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass(frozen=True)
class ShardIo:
    """What a worker needs to read input rows and read/write output shards."""

    out_uri: str
    layout: Layout
    storage_cfg: StorageConfig  # effective settings in the driver; actors get them without secrets

    def input_file(self, task: ShardTask) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(task.input_uri, self.storage_cfg)

    def input_rows(self, task: ShardTask, columns: list[str]) -> pa.Table:
        try:
            return read_rows(*self.input_file(task), task.start, task.stop, columns=columns)
        except OSError as exc:
            raise storage.explain(exc, task.input_uri, "read") from exc

    def output_uri(self, task: ShardTask) -> str:
        return storage.join(self.out_uri, task.name)

    def output_file(self, task: ShardTask) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(self.output_uri(task), self.storage_cfg)


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


def _file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def plan_shards(input_uri: str, manifest: Manifest, rows_per_shard: int) -> list[ShardTask]:
    """Cut every input shard into row ranges of at most `rows_per_shard`, numbered in input order."""
    tasks: list[ShardTask] = []
    for shard in manifest.shards:
        for start in range(0, shard.rows, rows_per_shard):
            tasks.append(ShardTask(len(tasks), storage.join(input_uri, shard.path), start,
                                   min(start + rows_per_shard, shard.rows)))
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
        manifest_sha = _sha256(read_manifest_bytes(uri, cfg.storage)[1])
    except (DatasetError, StorageError) as exc:
        raise RefineError(f"input {uri} is not a dataset in the simgan_dist contract: {exc}") from exc
    want = [model.image_height, model.image_width, model.image_channels]
    if list(manifest.image_shape) != want:
        raise RefineError(f"input {uri} holds {'x'.join(map(str, manifest.image_shape))} (HxWxC) images but the "
                          f"checkpoint's refiner was trained on {'x'.join(map(str, want))}")
    return manifest, manifest_sha


def _location(uri: str, cfg: Config) -> tuple[str, str]:
    fs, path = storage.resolve(uri, cfg.storage)
    return fs.type_name, path


def _check_output(out_uri: str, input_uri: str, cfg: Config, spec: dict[str, Any]) -> bool:
    """Refuse an output prefix that holds anything but this job's own work; True if it is already complete."""
    try:
        if _location(out_uri, cfg) == _location(input_uri, cfg):
            raise RefineError(f"--out {out_uri} is the input dataset itself: choose another prefix")
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
# Shard I/O (runs in the actors and in driver threads)


def read_rows(fs: pafs.FileSystem, path: str, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        groups, first, offset = [], 0, 0
        for g in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                first = first if groups else offset
                groups.append(g)
            offset += n
        if offset < stop:
            raise DatasetError(f"{path}: has {offset} rows, rows up to {stop} were expected")
        table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


def refine_shard(task: ShardTask, io: ShardIo, refiner: BatchRefiner) -> ShardInfo:
    """Read one task's input rows, refine the images, write the output shard."""
    layout = io.layout
    table = io.input_rows(task, layout.columns)
    refined = refiner(images_from_binary(table.column("image"), layout.image_shape, layout.image_dtype))
    image = pa.FixedSizeBinaryArray.from_buffers(pa.binary(layout.image_nbytes), task.rows,
                                                 [None, pa.py_buffer(refined)])
    columns = [image if name == "image" else table.column(name) for name in layout.columns]
    data, digest = encode_shard(pa.Table.from_arrays(columns, schema=layout.arrow_schema()))
    storage.write_bytes_atomic(io.output_uri(task), data, io.storage_cfg)
    return ShardInfo(path=task.name, rows=task.rows, bytes=len(data), sha256=digest)


def verify_shard(task: ShardTask, io: ShardIo, checksum: bool) -> tuple[ShardInfo | None, str | None]:
    """Compare an output shard with its input rows: schema, row count, ids equal, labels bit-identical.

    With `checksum` the whole file is hashed too (shards left by an earlier run);
    without it only the footer and the id and label columns are read (the final pass).
    Returns (info, None) or (None, what is wrong).
    """
    layout, (fs, path) = io.layout, io.output_file(task)
    keys = ["id", *layout.label_fields]
    try:
        digest = _file_sha256(fs, path) if checksum else ""
        with fs.open_input_file(path) as f:
            size, parquet = f.size(), pq.ParquetFile(f)
            if not parquet.schema_arrow.equals(layout.arrow_schema(), check_metadata=False):
                return None, f"{task.name}: schema differs from the input's layout"
            if parquet.metadata.num_rows != task.rows:
                return None, f"{task.name}: {parquet.metadata.num_rows} rows, expected {task.rows}"
            got = parquet.read(columns=keys)
    except FileNotFoundError:
        return None, f"{task.name}: missing"
    except (OSError, pa.ArrowInvalid) as exc:
        return None, f"{task.name}: unreadable ({exc})"
    want = io.input_rows(task, keys)
    if not got.column("id").equals(want.column("id")):
        return None, f"{task.name}: ids differ from input rows {task.start}..{task.stop} of {task.input_uri}"
    for name, shape in layout.label_fields.items():
        a, b = (labels_from_list(t.column(name), shape) for t in (got, want))
        if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
            return None, f"{task.name}: label {name!r} is not bit-identical to the input"
    return ShardInfo(path=task.name, rows=task.rows, bytes=size, sha256=digest), None


class RefinerActor:
    """Ray Data UDF: a batch of shard tasks in, one verified ShardInfo row per shard out.

    A shard an earlier run left (`exists`) is checked in full (sha256, ids, labels) and kept
    if sound; anything else is refined, written, read back and compared with its input.
    A shard that fails with a clear error (storage that keeps failing) comes out as a row
    with that `error`: the other shards still get done, and the driver reports it in one line
    instead of Ray Data's traceback of this actor.
    """

    def __init__(self, model_cfg: ModelConfig, weights: dict[str, torch.Tensor], io: ShardIo, batch_size: int,
                 compile: bool, env: list | None = None):
        from simgan_dist.data.pipeline import adopt_env

        adopt_env(env)
        refiner = build_refiner(model_cfg)
        refiner.load_state_dict(weights)
        self.refiner = BatchRefiner(refiner, batch_size, compile=compile, depth=io.layout.image_dtype == "uint16")
        self.io = io

    def run(self, task: ShardTask, exists: bool) -> tuple[ShardInfo, bool]:
        """(info, reused)."""
        if exists:
            info, problem = verify_shard(task, self.io, checksum=True)
            if info is not None:
                return info, True
            print(f"refine: redoing {problem}", file=sys.stderr)
        written = refine_shard(task, self.io, self.refiner)
        info, problem = verify_shard(task, self.io, checksum=False)
        if info is None or info.bytes != written.bytes:
            raise RefineError(f"{task.name} read back wrong after writing: {problem or 'size changed'}")
        return written, False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for i in range(len(batch["index"])):
            task = ShardTask(int(batch["index"][i]), str(batch["input_uri"][i]), int(batch["start"][i]),
                             int(batch["stop"][i]))
            try:
                rows.append((*self.run(task, bool(batch["exists"][i])), ""))
            except UserError as exc:
                rows.append((ShardInfo(task.name, task.rows, 0, ""), False, str(exc)))
        out = {f.name: [getattr(info, f.name) for info, _, _ in rows] for f in dataclasses.fields(ShardInfo)}
        out["reused"] = [reused for _, reused, _ in rows]
        out["error"] = [error for _, _, error in rows]
        return out


# ---------------------------------------------------------------------------------------------
# The driver


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True, smoothing=0.1,
                disable=not enabled, file=sys.stdout)


def actor_resources(refine_cfg: RefineConfig) -> dict[str, float]:
    """What each actor asks of the scheduler: `refine.num_gpus` GPUs, or one CPU. Never read from
    the cluster's current state — the autoscaler adds what is asked for."""
    return {"num_gpus": refine_cfg.num_gpus} if refine_cfg.num_gpus else {"num_cpus": 1}


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
    from ray.data import ActorPoolStrategy

    from simgan_dist.data.pipeline import share_env

    cfg = job.cfg.refine
    resources = actor_resources(cfg)
    stats: dict[str, Any] = {"actors": f"{cfg.min_actors}-{cfg.max_actors}", "num_gpus": cfg.num_gpus,
                             "precision": "bf16" if cfg.num_gpus and job.io.layout.image_dtype == "uint8" else "fp32",
                             "batch_size": job.batch_size}
    if cfg.num_gpus and not ray.cluster_resources().get("GPU"):
        print(f"refine: no GPU in the cluster yet; the actors wait for the autoscaler to add nodes with "
              f"{cfg.num_gpus} GPU(s) each (refine.num_gpus=0 refines on CPUs)", file=sys.stderr)
    todo = ray.data.from_items([{**dataclasses.asdict(t), "exists": t.name in present} for t in job.tasks],
                               override_num_blocks=len(job.tasks))
    # The actors get the storage credentials in their environment, never as arguments.
    actor_io = dataclasses.replace(job.io, storage_cfg=storage.without_secrets(job.io.storage_cfg))
    env = share_env(storage.worker_env(job.io.storage_cfg))
    refined = todo.map_batches(
        RefinerActor,
        batch_size=1,
        compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors,
                                  max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR,
                                  max_concurrent_calls_per_actor=TASKS_RUNNING_PER_ACTOR,
                                  enable_true_multi_threading=True),
        fn_constructor_kwargs={"model_cfg": job.model_cfg, "weights": job.weights, "io": actor_io, "env": env,
                               "batch_size": job.batch_size, "compile": cfg.compile},
        batch_format="numpy",
        **resources,
    )
    infos, failed, finished_at, reused = {}, {}, [], 0
    index_of = {t.name: t.index for t in job.tasks}
    started = time.perf_counter()
    desc = f"refine ({stats['actors']} actors, {stats['precision']})"
    with _progress(sum(t.rows for t in job.tasks), 0, desc, progress) as bar:
        for row in refined.iter_rows():
            info = ShardInfo(str(row["path"]), int(row["rows"]), int(row["bytes"]), str(row["sha256"]))
            if row["error"]:
                failed[index_of[info.path]] = str(row["error"])
                continue
            infos[index_of[info.path]] = info
            if row["reused"]:
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
    storage.write_bytes_atomic(storage.join(out_uri, JOB_FILE), (json.dumps(job.spec, indent=2) + "\n").encode(),
                               cfg.storage)
    from simgan_dist.ray_cluster import connect

    connect()
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
    cfg = load_config(args.preset, args.config, args.overrides)
    refine(choose_checkpoint(args.checkpoint, cfg), args.input, args.out, cfg)
    return 0

