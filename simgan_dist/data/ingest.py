"""`simgan-dist ingest`: convert the datasets people download into the Parquet contract.

The formats (`simgan_dist.data.formats`, found by name) list their work items and read one
at a time; the plumbing here is shared: items are cut into fixed-size chunks, read in a
process pool (results consumed in chunk order, so the output and its ids do not depend on
the number of workers), checked row by row and written by `DatasetWriter`. An item that
cannot be used raises `Reject` and lands in `_quarantine/quarantine.parquet` (source_path,
reason, detail) beside the shards, written before the manifest; the manifest's `extra`
counts it. Nothing is dropped silently. The leading `_` keeps it out of what plain Parquet
readers take for the dataset's rows.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from simgan_dist.config import Config, StorageConfig, load_config
from simgan_dist.data import storage
from simgan_dist.data.formats import FORMATS, Format
from simgan_dist.data.formats.base import IngestError, Quarantined, Reject, Row
from simgan_dist.data.render import GAZE_CONVENTION
from simgan_dist.data.schema import Layout, Manifest
from simgan_dist.data.writer import DatasetWriter

QUARANTINE_NAME = "_quarantine/quarantine.parquet"
# Where datasets ingested before the `_` convention keep it (plain readers took it for data).
LEGACY_QUARANTINE_NAME = "quarantine.parquet"
KINDS = ("synthetic", "real", "real_test")


@dataclass
class IngestResult:
    format: str
    out: str
    rows: int
    quarantined: list[Quarantined]
    manifest: Manifest

    def reasons(self) -> Counter:
        return Counter(q.reason for q in self.quarantined)

    def summary(self) -> str:
        lines = [f"ingest {self.format}: {self.rows} rows written to {self.out}, "
                 f"{len(self.quarantined)} quarantined"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.reasons().items())]
        if self.quarantined:
            lines.append(f"  see {storage.join(self.out, QUARANTINE_NAME)}")
        return "\n".join(lines)


def check_row(row: Row, layout: Layout) -> Row:
    """Shapes and finite labels; gaze is normalised to a unit vector."""
    if row.image.shape != layout.image_shape or row.image.dtype != np.dtype(layout.image_dtype):
        raise Reject("wrong shape", f"image: expected {list(layout.image_shape)} {layout.image_dtype}, "
                     f"got {list(row.image.shape)} {row.image.dtype}")
    labels = {}
    for name, shape in layout.label_fields.items():
        try:
            value = np.asarray(row.labels[name], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise Reject("bad value", f"{name}: not numeric ({exc})") from None
        if value.size != math.prod(shape):
            raise Reject("wrong shape", f"{name}: expected {list(shape)}, got {list(value.shape)}")
        if not np.isfinite(value).all():
            raise Reject("bad label", f"{name}: NaN or infinite value {value.ravel().tolist()}")
        if name == "gaze":
            norm = float(np.linalg.norm(value))
            if norm < 1e-6:
                raise Reject("bad label", "gaze: zero-length vector")
            value = value / norm
        labels[name] = value.reshape(shape)
    return Row(row.id, row.image, labels, row.source)


def read_chunk(fmt: Format, layout: Layout, items: list[Any]) -> tuple[dict[str, Any] | None, list[Quarantined]]:
    """Worker side: one chunk of items → a batch of checked rows (None if empty) and the rejects."""
    rows, bad = [], []
    for out in fmt.read(items):
        if isinstance(out, Quarantined):
            bad.append(out)
            continue
        try:
            rows.append(check_row(out, layout))
        except Reject as r:
            bad.append(Quarantined(out.source, r.reason, r.detail))
    if not rows:
        return None, bad
    batch = {"id": [r.id for r in rows], "image": np.stack([r.image for r in rows]),
             "source": [r.source for r in rows]}
    batch.update({name: np.stack([r.labels[name] for r in rows]) for name in layout.label_fields})
    return batch, bad


def ordered_map(fn: Callable, tasks: list[Any], workers: int) -> Iterator[Any]:
    """fn over tasks in a process pool, yielded in task order; at most two tasks per worker in flight,
    so a slow chunk never lets finished results pile up in memory."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    # spawn, not fork: the driver may already run Arrow/S3 threads, which fork would copy mid-flight.
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    try:
        window: deque = deque()
        for task in tasks:
            window.append(pool.submit(fn, task))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def write_quarantine(uri: str, quarantined: list[Quarantined], storage_cfg: StorageConfig | None = None) -> None:
    """`_quarantine/quarantine.parquet` under the dataset, always written (empty too) so no stale one survives."""
    table = pa.table({name: pa.array([getattr(q, name) for q in quarantined], pa.string())
                      for name in ("source_path", "reason", "detail")})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(storage.join(uri, QUARANTINE_NAME), sink.getvalue(), storage_cfg)


def read_quarantine(uri: str, storage_cfg: StorageConfig | None = None) -> pa.Table:
    try:
        data = storage.read_bytes(storage.join(uri, QUARANTINE_NAME), storage_cfg)
    except storage.MissingFileError:
        data = storage.read_bytes(storage.join(uri, LEGACY_QUARANTINE_NAME), storage_cfg)
    return pq.read_table(io.BytesIO(data))


def ingest(format_name: str, src: str | Path, out: str, *, cfg: Config | None = None, kind: str | None = None,
           labels_csv: str | Path | None = None, rows_per_shard: int = 50_000, workers: int | None = None,
           overwrite: bool = False, progress: bool = False) -> IngestResult:
    """Convert SRC (a downloaded dataset in `format_name`) into a contract dataset at `out`."""
    if format_name not in FORMATS:
        raise IngestError(f"unknown format {format_name!r}: choose one of {sorted(FORMATS)}")
    if kind is not None and kind not in KINDS:
        raise IngestError(f"kind must be one of {KINDS}, got {kind!r}")
    if labels_csv is not None and format_name != "folder":
        raise IngestError(f"--labels applies to the folder format only, not {format_name}")
    cfg = cfg or Config()
    src = Path(src).expanduser()
    if not src.exists():
        raise IngestError(f"{src}: no such file or folder")
    if src.is_dir() and not any(src.iterdir()):
        raise IngestError(f"{src}: the folder is empty")
    if labels_csv is not None and not Path(labels_csv).is_file():
        raise IngestError(f"{labels_csv}: labels CSV not found")
    fmt = FORMATS[format_name](src, kind, cfg, Path(labels_csv) if labels_csv else None)
    layout, items, quarantined = fmt.scan()
    chunks = [items[i:i + fmt.items_per_task] for i in range(0, len(items), fmt.items_per_task)]
    extra: dict[str, Any] = {"src": str(src.resolve()), "format": format_name}
    if "gaze" in layout.label_fields:
        extra["gaze_convention"] = GAZE_CONVENTION
    with DatasetWriter(out, layout, kind=kind or fmt.default_kind(layout), source=f"ingest:{format_name}",
                       extra=extra, rows_per_shard=rows_per_shard, storage_cfg=cfg.storage,
                       overwrite=overwrite) as writer, \
            tqdm(total=len(items), desc=f"ingest {format_name}", unit="item", disable=not progress) as bar:
        task = partial(read_chunk, fmt, layout)
        for chunk, (batch, bad) in zip(chunks, ordered_map(task, chunks, workers or os.cpu_count() or 1),
                                       strict=True):
            if batch is not None:
                writer.write(batch)
            quarantined += bad
            bar.update(len(chunk))
        # Staged with the shards, so a failed overwrite keeps the old dataset's quarantine.
        write_quarantine(writer.staging, quarantined, cfg.storage)
        writer.extra_files.append(QUARANTINE_NAME)
        writer.extra.update(quarantined=len(quarantined), quarantine=QUARANTINE_NAME,
                            quarantine_reasons=dict(sorted(Counter(q.reason for q in quarantined).items())))
        manifest = writer.close()
    return IngestResult(format_name, out, manifest.rows, quarantined, manifest)


def cli_ingest(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    result = ingest(args.format, args.src, args.out, cfg=cfg, kind=args.kind, labels_csv=args.labels,
                    rows_per_shard=args.rows_per_shard, workers=args.workers, overwrite=args.overwrite,
                    progress=sys.stderr.isatty())
    print(result.summary())
    if not result.rows:
        print("simgan-dist ingest: error: no usable rows (every item was quarantined)", file=sys.stderr)
        return 1
    return 0
