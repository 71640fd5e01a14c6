"""Writing a dataset in the contract of `schema.py`: shards first, `_manifest.json` last.

A new dataset's shards go to a fresh generation, `<prefix>/_staging-<gen>/` (the `_` hides
it from plain readers), and `commit` then makes it the dataset at the prefix: a crash at
any point leaves the old dataset or the new one, never neither, and a plain Parquet reader
never sees rows of both. An existing dataset is only replaced with `overwrite`. One writer
per prefix at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from simgan_dist.config import StorageConfig
from simgan_dist.data import storage
from simgan_dist.data.schema import (
    LEGACY_MANIFEST_NAME,
    LEGACY_METADATA,
    MANIFEST_NAME,
    STAGING_PREFIX,
    DatasetError,
    Layout,
    Manifest,
    ShardInfo,
    is_shard_name,
    shard_name,
)

# Shards are cut into row groups so that readers can stream a big shard in pieces.
ROW_GROUP_ROWS = 8192


def encode_shard(table: pa.Table) -> tuple[bytes, str]:
    """A table → Parquet file bytes and their sha256."""
    sink = io.BytesIO()
    # zstd level 1: about as fast as snappy, and noisy real images still shrink a little.
    pq.write_table(table, sink, compression="zstd", compression_level=1, row_group_size=ROW_GROUP_ROWS)
    data = sink.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def write_shard(uri: str, index: int, layout: Layout, rows: dict[str, np.ndarray],
                storage_cfg: StorageConfig | None = None) -> ShardInfo:
    """Write checked rows as shard `index` of the dataset at `uri` (parallel writers call this)."""
    data, digest = encode_shard(layout.to_table(rows))
    name = shard_name(index)
    storage.write_bytes_atomic(storage.join(uri, name), data, storage_cfg)
    return ShardInfo(path=name, rows=len(rows["id"]), bytes=len(data), sha256=digest)


def prepare_output(uri: str, storage_cfg: StorageConfig | None = None, overwrite: bool = False) -> str:
    """Check that `uri` may take a new dataset (an existing one only with `overwrite`);
    returns the staging prefix its shards go to before `commit`. Nothing is deleted yet."""
    storage.check_bucket(uri, storage_cfg)
    names = storage.list_files(uri, storage_cfg)
    existing = [n for n in (MANIFEST_NAME, LEGACY_MANIFEST_NAME) if n in names] or [n for n in names
                                                                                   if is_shard_name(n)]
    if existing and not overwrite:
        raise DatasetError(f"{uri}: already holds a dataset ({existing[0]}); pass --overwrite to replace it "
                           "or choose another output")
    return storage.join(uri, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")


def write_manifest(uri: str, manifest: Manifest, storage_cfg: StorageConfig | None = None) -> None:
    """Write `_manifest.json` atomically: what readers take for the dataset from then on."""
    if not manifest.created:
        manifest.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_bytes_atomic(storage.join(uri, MANIFEST_NAME), manifest.to_json().encode(), storage_cfg)


def commit(uri: str, staging: str, manifest: Manifest, storage_cfg: StorageConfig | None = None,
           extra_files: tuple[str, ...] = ()) -> None:
    """Make the dataset staged under `staging` (shards named as in `manifest`, plus `extra_files`)
    the dataset at `uri`. Each step leaves a whole dataset for our readers and one generation
    for plain readers:

    1. the manifest, naming the staged shards, replaces the old one: the commit point
       (plain readers still see the old shards);
    2. the old shards go (plain readers see fewer old rows, then none);
    3. the new shards are copied up beside the manifest (plain readers see new rows only);
    4. the manifest is rewritten to name them, and every staging folder goes.
    """
    gen = staging.rstrip("/").rsplit("/", 1)[1]
    if not manifest.created:  # one timestamp for both manifests of the commit
        manifest.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_manifest(uri, dataclasses.replace(
        manifest, shards=[dataclasses.replace(s, path=f"{gen}/{s.path}") for s in manifest.shards]), storage_cfg)
    names = storage.list_files(uri, storage_cfg)
    storage.delete_files(uri, [n for n in names if is_shard_name(n) or n in LEGACY_METADATA], storage_cfg)
    for name in [s.path for s in manifest.shards] + list(extra_files):
        storage.copy_file(storage.join(staging, name), storage.join(uri, name), storage_cfg)
    write_manifest(uri, manifest, storage_cfg)
    for name in storage.list_files(uri, storage_cfg, pafs.FileType.Directory):
        if name.startswith(STAGING_PREFIX):  # ours, and any left by a crashed write
            storage.delete_dir(storage.join(uri, name), storage_cfg)


class DatasetWriter:
    """Buffers rows into shards of `rows_per_shard` and writes the manifest on `close()`.

        with DatasetWriter(uri, layout, kind="synthetic", source="simulate") as w:
            w.write({"id": ids, "image": images, "gaze": gaze})

    Shards go to `staging` and `close()` commits them (see `commit`); leaving the `with`
    block by an exception commits nothing: the prefix keeps its old dataset, if any.
    Files written under `staging` and named in `extra_files` are committed with the shards.
    """

    def __init__(self, uri: str, layout: Layout, *, kind: str, source: str,
                 extra: dict[str, Any] | None = None, rows_per_shard: int = 50_000,
                 storage_cfg: StorageConfig | None = None, overwrite: bool = False):
        if rows_per_shard < 1:
            raise DatasetError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.uri, self.layout, self.kind, self.source = uri, layout, kind, source
        self.extra = dict(extra or {})
        self.rows_per_shard = rows_per_shard
        self.storage_cfg = storage_cfg
        self.shards: list[ShardInfo] = []
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._ids: set[str] = set()
        self._closed = False
        self.extra_files: list[str] = []
        self.staging = prepare_output(uri, storage_cfg, overwrite)

    def write(self, batch: dict[str, Any]) -> None:
        if self._closed:
            raise DatasetError(f"{self.uri}: writer is closed")
        rows = self.layout.check_batch(batch, self.source)
        ids = rows["id"]
        new = set(ids)
        if len(new) != len(ids) or not self._ids.isdisjoint(new):
            raise DatasetError(f"{self.uri}: id: duplicate id {_first_duplicate(ids, self._ids)!r}")
        self._ids |= new
        self._pending.append(rows)
        self._pending_rows += len(ids)
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        rows = {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
        head = {k: v[:n] for k, v in rows.items()}
        tail = {k: v[n:] for k, v in rows.items()}
        self._pending = [tail] if len(tail["id"]) else []
        self._pending_rows = len(tail["id"])
        self.shards.append(write_shard(self.staging, len(self.shards), self.layout, head, self.storage_cfg))

    def close(self) -> Manifest:
        if self._closed:
            raise DatasetError(f"{self.uri}: writer is already closed")
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._closed = True
        manifest = make_manifest(self.layout, self.shards, kind=self.kind, source=self.source, extra=self.extra)
        commit(self.uri, self.staging, manifest, self.storage_cfg, tuple(self.extra_files))
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()
        elif exc_type is not None:
            with contextlib.suppress(storage.StorageError):  # the next commit removes it anyway
                storage.delete_dir(self.staging, self.storage_cfg)


def _first_duplicate(ids: np.ndarray, seen: set[str]) -> str:
    seen = set(seen)
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    raise AssertionError("no duplicate")


def make_manifest(layout: Layout, shards: list[ShardInfo], *, kind: str, source: str,
                  extra: dict[str, Any] | None = None) -> Manifest:
    return Manifest(
        rows=sum(s.rows for s in shards), shards=list(shards), image_shape=list(layout.image_shape),
        image_dtype=layout.image_dtype, label_fields={k: list(v) for k, v in layout.label_fields.items()},
        kind=kind, source=source, extra=dict(extra or {}),
    )
