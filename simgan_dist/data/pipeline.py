"""Ray Data over the dataset contract, and Ray tasks for parallel writers.

The only module of `simgan_dist.data` that imports Ray.

    ds = read_dataset("s3://bucket/eyes/synthetic", cfg.storage)     # validated first
    for batch in ds.iter_torch_batches(batch_size=512):
        batch["image"]   # uint8 N×H×W×C — normalise on the worker/GPU, not here
        batch["gaze"]    # float32 N×3

For Ray Train pass the datasets to the trainer (`datasets={"synthetic": ds, "real": real}`)
and read `ray.train.get_dataset_shard(name)` on each worker: every call of
`iter_torch_batches` on a shard is a new epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from simgan_dist.config import StorageConfig
from simgan_dist.data.decode import decode_table
from simgan_dist.data.schema import DatasetError, Layout, shard_paths, validate
from simgan_dist.errors import UserError


def read_dataset(uri: str, storage_cfg: StorageConfig | None = None, *, columns: Sequence[str] | None = None,
                 verify_checksums: bool = False, shuffle_files: bool = False) -> ray.data.Dataset:
    """A Ray Dataset over a finished dataset, with images decoded to N×H×W×C arrays.

    The manifest and every shard's size, row count and schema are checked on the
    driver first (`verify_checksums` also hashes every byte). Ray reads exactly the
    manifest's shards through an explicit pyarrow filesystem, so S3-compatible
    endpoints work on every worker. `columns` defaults to the image and the labels:
    `id` and `source` are strings, which `iter_torch_batches` cannot turn into tensors;
    ask for them explicitly (for example to carry ids through a refinement job).
    """
    manifest = validate(uri, storage_cfg, verify_checksums=verify_checksums)
    layout = manifest.layout
    columns = list(columns) if columns is not None else ["image", *layout.label_fields]
    unknown = [c for c in columns if c not in layout.columns]
    if unknown:
        raise DatasetError(f"{uri}: no column(s) {unknown}; the dataset has {layout.columns}")
    fs, paths = shard_paths(uri, manifest, storage_cfg)
    if not paths:
        raise DatasetError(f"{uri}: the dataset has no rows")
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle="files" if shuffle_files else None)
    # Ray pushes the projection down into the Parquet read: unused columns are never fetched.
    ds = ds.select_columns(columns)
    return ds.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs={"layout": layout}, batch_size=None)


def decode_batch(table: pa.Table, layout: Layout) -> dict[str, np.ndarray]:
    """One Arrow batch of the contract → numpy columns (uint8/uint16 images, float32 labels)."""
    return decode_table(table, layout)


def share_env(env: dict[str, str]) -> list[ray.ObjectRef]:
    """Environment variables (storage credentials) for Ray workers, held in the object store.

    Not `runtime_env={"env_vars": ...}`: Ray's runtime-env agent logs those in clear text
    on every node. The reference is wrapped in a list so that Ray passes the reference,
    not the value inlined into the task or actor spec; workers call `adopt_env`.
    """
    return [ray.put(dict(env))]


def adopt_env(shared: list[ray.ObjectRef] | None) -> None:
    """Worker side of `share_env`: set the variables in this worker process (None: nothing to set)."""
    if shared:
        os.environ.update(ray.get(shared[0]))


def _call_with_env(shared: list[ray.ObjectRef], fn: Callable[..., Any], *args: Any) -> Any:
    adopt_env(shared)
    return fn(*args)


def parallel_map(fn: Callable[..., Any], tasks: Sequence[tuple], *, desc: str = "",
                 weights: Sequence[int] | None = None, progress: bool = False,
                 num_cpus: float = 1.0, env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(*args)` for every tuple in `tasks` as Ray tasks; results in task order.

    `env`: environment variables for the tasks (storage credentials: `storage.worker_env`),
    delivered through the object store (`share_env`).

    Joins or starts Ray as every command does (`ray_cluster.connect`). The
    progress bar counts `weights` (e.g. rows) as tasks finish. Tasks are retried
    on worker failure, so `fn` must be idempotent (writing a fixed shard path is).
    """
    from tqdm import tqdm

    from simgan_dist.ray_cluster import connect

    connect()
    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(_call_with_env)
    shared = share_env(env or {})
    refs = [remote.remote(shared, fn, *args) for args in tasks]
    position = {ref: i for i, ref in enumerate(refs)}
    weights = list(weights) if weights is not None else [1] * len(tasks)
    results: list[Any] = [None] * len(tasks)
    pending = list(refs)
    with tqdm(total=sum(weights), desc=desc, disable=not progress, unit="row") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = position[done[0]]
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                # A clear error raised in a task reaches the user as itself, not as Ray's remote traceback.
                if isinstance(exc.cause, UserError):
                    raise exc.cause from None
                raise
            bar.update(weights[i])
    return results
