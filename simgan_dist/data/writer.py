"""Writing a dataset in the contract of `schema.py`: shards first, `_manifest.json` last.

`write_manifest` is the commit point: until it runs the prefix is an unfinished write
that every reader refuses.
"""

from __future__ import annotations

import datetime
import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgan_dist.config import StorageConfig
from simgan_dist.data import storage
from simgan_dist.data.schema import (
    LEGACY_MANIFEST_NAME,
    LEGACY_METADATA,
    MANIFEST_NAME,
    DatasetError,
    Layout,
    Manifest,
    ShardInfo,
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


def prepare_output(uri: str, storage_cfg: StorageConfig | None = None, overwrite: bool = False) -> None:
    """Make `uri` ready for a new dataset: refuse (or, with overwrite, clear) an existing one.

    The old manifest goes first, so a crash in between leaves an incomplete dataset,
    never a manifest pointing at a mix of old and new shards.
    """
    storage.check_bucket(uri, storage_cfg)
    names = storage.list_files(uri, storage_cfg)
    manifests = [n for n in (MANIFEST_NAME, LEGACY_MANIFEST_NAME) if n in names]
    if manifests and not overwrite:
        raise DatasetError(f"{uri}: already holds a dataset ({manifests[0]}); choose another output "
                           "or allow overwriting")
    old = [n for n in names if n.startswith("part-") and n.endswith(".parquet")]
    metadata = [n for n in (MANIFEST_NAME, *LEGACY_METADATA) if n in names]
    storage.delete_files(uri, metadata + old, storage_cfg)


def write_manifest(uri: str, manifest: Manifest, storage_cfg: StorageConfig | None = None) -> None:
    """The commit point of a dataset: call it after every shard is written."""
    if not manifest.created:
        manifest.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_bytes_atomic(storage.join(uri, MANIFEST_NAME), manifest.to_json().encode(), storage_cfg)


class DatasetWriter:
    """Buffers rows into shards of `rows_per_shard` and writes the manifest on `close()`.

        with DatasetWriter(uri, layout, kind="synthetic", source="simulate") as w:
            w.write({"id": ids, "image": images, "gaze": gaze})

    Leaving the `with` block by an exception writes no manifest: the prefix stays
    visibly incomplete instead of looking like a smaller dataset.
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
        prepare_output(uri, storage_cfg, overwrite)

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
        self.shards.append(write_shard(self.uri, len(self.shards), self.layout, head, self.storage_cfg))

    def close(self) -> Manifest:
        if self._closed:
            raise DatasetError(f"{self.uri}: writer is already closed")
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._closed = True
        manifest = make_manifest(self.layout, self.shards, kind=self.kind, source=self.source, extra=self.extra)
        write_manifest(self.uri, manifest, self.storage_cfg)
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()


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
