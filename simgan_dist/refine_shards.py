"""One shard task of the refine job (`refine.py`), run in a `RefinerActor`: read, refine, write, verify.

Sizes come from the image size in bytes, not a fixed row count (`refine_sizes`): a batch's
activations fit `refine.batch_memory_gb` (eye: ~4,000 images, hand: ~80), a task holds
`refine.task_mb` of input images. An actor reads its input rows, refines them in batches
(uint8 shipped to the device and normalised there; bf16 and channels-last on GPU, depth
fp32; optional torch.compile) and writes the shard atomically (one PUT, or a rename). `id`,
labels and `source` are passed through as Arrow columns, never decoded, so they stay
bit-identical.

Verification happens in the actors, beside the data they already hold: an actor hashes the
input shard it reads and compares it with the input manifest's sha256 before refining (an input
shard cut into several tasks is read once per task); after writing a shard it reads it back
(footer, ids, labels) and compares it with its input rows; a shard an earlier run left is
checked the same way, plus its sha256, and kept or redone. A refiner whose output holds NaN
or infinity fails the shard instead of writing flat images.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from simgan_dist.config import ModelConfig, RefineConfig, StorageConfig
from simgan_dist.core.imaging import normalize, to_storage
from simgan_dist.core.models import Refiner, build_refiner
from simgan_dist.data import storage
from simgan_dist.data.decode import images_from_binary, labels_from_list
from simgan_dist.data.schema import (
    DatasetError,
    Layout,
    ShardInfo,
    shard_name,
)
from simgan_dist.data.writer import encode_shard
from simgan_dist.errors import UserError

# Live activation maps of the refiner's width per image during a forward pass
# (a residual block's input, its two convolutions, the sum), measured within ~2x.
LIVE_ACTIVATIONS = 4


# Here, not in refine.py, because the actors raise it too.
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
            # to_storage would clamp NaN to a flat image: a diverged refiner must not pass for a result.
            # The flag is read after to_storage's download, so a GPU batch costs no extra stall.
            finite = torch.isfinite(y[:n]).all()
            out[start:start + n] = to_storage(y[:n], images.dtype, None if centres is None else centres[:n])
            if not finite.item():
                raise RefineError("the refiner's output holds NaN or infinity (diverged or corrupt weights): "
                                  "nothing of this shard was written")
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
# Shard I/O (runs in the actors and in driver threads)


@dataclass(frozen=True)
class ShardTask:
    """Output shard `index` = rows [start, stop) of the input shard at `input_uri`, whose size and
    sha256 the input manifest records."""

    index: int
    input_uri: str
    start: int
    stop: int
    input_bytes: int
    input_sha256: str

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
        """The task's input rows, reading only the row groups and columns that hold them (unverified)."""
        fs, path = self.input_file(task)
        try:
            with fs.open_input_file(path) as f:
                return read_rows(f, task.start, task.stop, task.input_uri, columns)
        except OSError as exc:
            raise storage.explain(exc, task.input_uri, "read") from exc

    def read_verified(self, task: ShardTask) -> bytes:
        """The task's whole input shard, checked against the input manifest's size and sha256."""
        fs, path = self.input_file(task)
        try:
            with fs.open_input_stream(path) as f:
                data = f.readall()
        except OSError as exc:
            raise storage.explain(exc, task.input_uri, "read") from exc
        if len(data) != task.input_bytes or hashlib.sha256(data).hexdigest() != task.input_sha256:
            raise DatasetError(f"{task.input_uri}: {len(data)} bytes whose sha256 does not match the input manifest "
                               f"({task.input_bytes} bytes): corrupt or replaced shard, nothing refined from it")
        return data

    def output_uri(self, task: ShardTask) -> str:
        return storage.join(self.out_uri, task.name)

    def output_file(self, task: ShardTask) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(self.output_uri(task), self.storage_cfg)


class VerifiedInputs:
    """Input shards read whole and checked against the input manifest, kept for the next tasks.

    An input shard is cut into several tasks (simulate writes 50,000 rows per shard, a task holds
    `refine.task_mb`), and an actor gets consecutive tasks: without this each task read and hashed
    the whole shard again (25x the corpus at 1.2M rows, and as many GETs on object storage).
    Threads asking for a shard that is being read wait for that read. At most `keep_bytes` are
    kept, newest first; a read that failed is not kept.
    """

    def __init__(self, io: ShardIo, keep_bytes: int = 1 << 30):
        self.io = io
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._shards: OrderedDict[str, Future] = OrderedDict()

    def rows(self, task: ShardTask, columns: list[str]) -> pa.Table:
        return read_rows(pa.BufferReader(self._shard(task)), task.start, task.stop, task.input_uri, columns)

    def _shard(self, task: ShardTask) -> bytes:
        with self._lock:
            shard = self._shards.get(task.input_uri)
            reader = shard is None
            if reader:
                shard = self._shards[task.input_uri] = Future()
            self._shards.move_to_end(task.input_uri)
        if reader:
            try:
                shard.set_result(self.io.read_verified(task))
            except BaseException as exc:
                shard.set_exception(exc)
                with self._lock:
                    self._shards.pop(task.input_uri, None)
            with self._lock:
                self._evict()
        return shard.result()

    def _evict(self) -> None:
        sizes = {uri: len(f.result()) for uri, f in self._shards.items() if f.done()}
        while self._shards and sum(sizes.values()) > self.keep_bytes:
            uri, _ = self._shards.popitem(last=False)
            sizes.pop(uri, None)


def _file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_rows(source, start: int, stop: int, where: str, columns: list[str] | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet file (an open file or a buffer), reading only the row groups
    that hold them."""
    parquet = pq.ParquetFile(source)
    groups, first, offset = [], 0, 0
    for g in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            first = first if groups else offset
            groups.append(g)
        offset += n
    if offset < stop:
        raise DatasetError(f"{where}: has {offset} rows, rows up to {stop} were expected")
    return parquet.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def refine_shard(task: ShardTask, io: ShardIo, refiner: BatchRefiner, inputs: VerifiedInputs | None = None
                 ) -> ShardInfo:
    """Read one task's input rows (verified against the input manifest), refine the images, write the
    output shard."""
    layout = io.layout
    table = (inputs or VerifiedInputs(io, keep_bytes=0)).rows(task, layout.columns)
    refined = refiner(images_from_binary(table.column("image"), layout.image_shape, layout.image_dtype))
    image = pa.FixedSizeBinaryArray.from_buffers(pa.binary(layout.image_nbytes), task.rows,
                                                 [None, pa.py_buffer(refined)])
    columns = [image if name == "image" else table.column(name) for name in layout.columns]
    data, digest = encode_shard(pa.Table.from_arrays(columns, schema=layout.arrow_schema()))
    storage.write_bytes_atomic(io.output_uri(task), data, io.storage_cfg)
    return ShardInfo(path=task.name, rows=task.rows, bytes=len(data), sha256=digest)


def verify_shard(task: ShardTask, io: ShardIo, checksum: bool, inputs: VerifiedInputs | None = None
                 ) -> tuple[ShardInfo | None, str | None]:
    """Compare an output shard with its input rows: schema, row count, ids equal, labels bit-identical.

    With `checksum` the whole file is hashed too (shards left by an earlier run);
    without it only the footer and the id and label columns are read (the final pass).
    The input rows come from `inputs` when given, else from a read of their columns.
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
    want = inputs.rows(task, keys) if inputs else io.input_rows(task, keys)
    if not got.column("id").equals(want.column("id")):
        return None, f"{task.name}: ids differ from input rows {task.start}..{task.stop} of {task.input_uri}"
    for name, shape in layout.label_fields.items():
        a, b = (labels_from_list(t.column(name), shape) for t in (got, want))
        if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
            return None, f"{task.name}: label {name!r} is not bit-identical to the input"
    return ShardInfo(path=task.name, rows=task.rows, bytes=size, sha256=digest), None


def actor_device(assigned_gpus: list | None = None) -> torch.device:
    """The device of a refine actor, from the GPUs Ray assigned to it (`ray.get_gpu_ids()`), never
    from `torch.cuda.is_available()`: a CPU actor (refine.num_gpus=0) placed on a GPU node sees
    that node's GPUs too, and would take cuda:0 (and bf16) beside the actors that own it while the
    manifest says fp32. With GPUs assigned, Ray's CUDA_VISIBLE_DEVICES makes them cuda:0..."""
    if assigned_gpus is None:
        import ray

        assigned_gpus = ray.get_gpu_ids()
    return torch.device("cuda" if assigned_gpus and torch.cuda.is_available() else "cpu")


class RefinerActor:
    """A Ray actor that runs shard tasks (`refine_pool.py`), several at once in threads.

    A shard an earlier run left (`exists`) is checked in full (sha256, ids, labels) and kept
    if sound; anything else is refined, written, read back and compared with its input.
    A shard that fails with a clear error (storage that keeps failing) comes back with that
    error: the other shards still get done, and the driver reports it in one line.

    The constructor takes only small values, inlined in the actor's spec, so that Ray can
    restart the actor after its node is lost. The weights and the storage credentials come
    with each task, as object references (`shared`), and are adopted by the first task after a
    start or restart.
    """

    def __init__(self, model_cfg: ModelConfig, io: ShardIo, batch_size: int, compile: bool):
        self.model_cfg, self.io, self.batch_size, self.compile = model_cfg, io, batch_size, compile
        self.inputs = VerifiedInputs(io)
        self._refiner: BatchRefiner | None = None
        self._start_lock = threading.Lock()

    def ready(self) -> bool:
        return True

    def _refiner_from(self, shared: RefineShared) -> BatchRefiner:
        with self._start_lock:
            if self._refiner is None:
                import ray

                from simgan_dist.data.pipeline import adopt_env

                adopt_env(shared.env)
                refiner = build_refiner(self.model_cfg)
                refiner.load_state_dict(ray.get(shared.weights[0]))
                self._refiner = BatchRefiner(refiner, self.batch_size, device=actor_device(), compile=self.compile,
                                             depth=self.io.layout.image_dtype == "uint16")
            return self._refiner

    def run(self, task: ShardTask, exists: bool, shared: RefineShared) -> tuple[ShardInfo, bool, str]:
        """(info, reused, error): `error` is empty unless the shard failed with a clear error."""
        try:
            if exists:
                info, problem = verify_shard(task, self.io, checksum=True)
                if info is not None:
                    return info, True, ""
                print(f"refine: redoing {problem}", file=sys.stderr)
            written = refine_shard(task, self.io, self._refiner_from(shared), self.inputs)
            info, problem = verify_shard(task, self.io, checksum=False, inputs=self.inputs)
            if info is None or info.bytes != written.bytes:
                raise RefineError(f"{task.name} read back wrong after writing: {problem or 'size changed'}")
            return written, False, ""
        except UserError as exc:
            return ShardInfo(task.name, task.rows, 0, ""), False, str(exc)


@dataclass(frozen=True)
class RefineShared:
    """What every task of a job carries by reference: the refiner's weights and the workers' environment
    (storage credentials), each an object reference wrapped in a list so that Ray passes the reference."""

    weights: list
    env: list


def actor_resources(refine_cfg: RefineConfig) -> dict[str, float]:
    """What each actor asks of the scheduler: `refine.num_gpus` GPUs, or one CPU. Never read from
    the cluster's current state — the autoscaler adds what is asked for."""
    return {"num_gpus": refine_cfg.num_gpus} if refine_cfg.num_gpus else {"num_cpus": 1}
