"""The dataset contract: Parquet shards plus a manifest, one dataset per prefix.

    <prefix>/part-00000.parquet, part-00001.parquet, ...   written first
    <prefix>/_manifest.json                                 written last

A prefix without `_manifest.json` is an unfinished write and every reader refuses it.
Everything in a prefix that is not data starts with `_` or `.` (the manifest, an
ingest's `_quarantine/`, refine's `_refine_job.json`, temporary files): that is the
convention pandas, pyarrow.dataset, Spark, DuckDB and Ray Data's `read_parquet` honour,
so they read a prefix with their defaults and see exactly its good rows.
Datasets written before that convention (`manifest.json`) are still read.
Rows are ordinary Parquet (pandas, pyarrow, Spark and Ray read them as they are):

    id        string, unique and stable
    image     fixed_size_binary(H*W*C*itemsize): raw row-major HWC bytes, uint8 eyes,
              uint16 depth — decoded with one np.frombuffer, no PNG per row
    <label>   fixed_size_list<float32>[k] per label field (gaze [3], pupil_xy [2],
              head_pose [3], joints_uvd [J, 3] flattened); unlabeled data has none
    source    string, where the row came from

The manifest records rows, shards (rows, bytes, sha256), image shape and dtype,
label fields, source, kind and a free-form `extra` dict; readers check the files
against it and fail with a message naming the shard or field that does not match.
Writing such a dataset is `writer.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from simgan_dist.config import StorageConfig
from simgan_dist.data import storage
from simgan_dist.data.decode import decode_table
from simgan_dist.data.storage import MissingFileError
from simgan_dist.errors import DatasetError

FORMAT = "simgan_dist.dataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "_manifest.json"
# The manifest's name before the `_` convention: still read, replaced on overwrite.
LEGACY_MANIFEST_NAME = "manifest.json"
# Other metadata files of the old layout that plain readers would take for data.
LEGACY_METADATA = (LEGACY_MANIFEST_NAME, "quarantine.parquet")
IMAGE_DTYPES = ("uint8", "uint16")


# Where `writer.commit` stages a new generation of shards (the `_` hides it from plain readers).
STAGING_PREFIX = "_staging-"
# The shard paths a manifest may name: plain shard names in the prefix, or in a staging
# folder while an overwrite commits. Never `..`, absolute paths or other folders.
SHARD_PATH = re.compile(rf"({STAGING_PREFIX}[0-9a-f]+/)?part-[A-Za-z0-9_.-]+\.parquet")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def is_shard_name(name: str) -> bool:
    """A file name that plain Parquet readers take for one of the dataset's shards."""
    return name.startswith("part-") and name.endswith(".parquet")


@dataclass
class Layout:
    """What every row of a dataset looks like: image shape/dtype and label shapes."""

    image_shape: tuple[int, int, int]
    image_dtype: str = "uint8"
    label_fields: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(v) for v in self.image_shape)
        self.label_fields = {name: tuple(int(v) for v in shape) for name, shape in self.label_fields.items()}
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise DatasetError(f"image_shape must be [H, W, C] with positive sizes, got {list(self.image_shape)}")
        if self.image_dtype not in IMAGE_DTYPES:
            raise DatasetError(f"image_dtype must be one of {IMAGE_DTYPES}, got {self.image_dtype!r}")
        for name in self.label_fields:
            if name in ("id", "image", "source"):
                raise DatasetError(f"label field {name!r} clashes with a built-in column")

    @property
    def image_nbytes(self) -> int:
        return math.prod(self.image_shape) * np.dtype(self.image_dtype).itemsize

    def label_size(self, name: str) -> int:
        return math.prod(self.label_fields[name])

    @property
    def columns(self) -> list[str]:
        return ["id", "image", *self.label_fields, "source"]

    def arrow_schema(self) -> pa.Schema:
        fields = [pa.field("id", pa.string(), nullable=False),
                  pa.field("image", pa.binary(self.image_nbytes), nullable=False)]
        fields += [pa.field(name, pa.list_(pa.float32(), self.label_size(name)), nullable=False)
                   for name in self.label_fields]
        fields.append(pa.field("source", pa.string(), nullable=False))
        # Plain Parquet readers learn the image layout from the file itself.
        meta = {"simgan_dist": json.dumps({"image_shape": list(self.image_shape),
                                           "image_dtype": self.image_dtype,
                                           "label_fields": {k: list(v) for k, v in self.label_fields.items()}})}
        return pa.schema(fields, metadata=meta)

    def check_batch(self, batch: dict[str, Any], source: str) -> dict[str, np.ndarray]:
        """Validate one batch of rows and normalise it to contiguous numpy arrays."""
        unknown = set(batch) - set(self.columns)
        if unknown:
            raise DatasetError(f"unknown column(s) {sorted(unknown)}: this dataset has {self.columns}")
        for name in ("id", "image", *self.label_fields):
            if name not in batch:
                raise DatasetError(f"batch is missing column {name!r}")
        image = np.asarray(batch["image"])
        n = len(image)
        if image.ndim == 3 and self.image_shape[2] == 1:
            image = image[..., None]
        if image.shape[1:] != self.image_shape:
            raise DatasetError(f"image: expected N x {list(self.image_shape)}, got shape {list(image.shape)}")
        if image.dtype != np.dtype(self.image_dtype):
            raise DatasetError(f"image: expected dtype {self.image_dtype}, got {image.dtype}")
        ids = np.asarray(batch["id"], dtype=object)
        if ids.shape != (n,):
            raise DatasetError(f"id: expected {n} ids (one per image), got shape {list(ids.shape)}")
        if not all(isinstance(i, str) and i for i in ids):
            raise DatasetError("id: every id must be a non-empty string")
        out = {"id": ids, "image": np.ascontiguousarray(image)}
        for name, shape in self.label_fields.items():
            values = np.asarray(batch[name])
            if values.shape not in ((n, *shape), (n, math.prod(shape))):
                raise DatasetError(f"{name}: expected shape {[n, *shape]}, got {list(values.shape)}")
            values = np.ascontiguousarray(values.reshape(n, -1), dtype=np.float32)
            if not np.isfinite(values).all():
                raise DatasetError(f"{name}: labels contain NaN or infinity")
            out[name] = values
        sources = batch.get("source", source)
        out["source"] = (np.full(n, sources, dtype=object) if isinstance(sources, str)
                         else np.asarray(sources, dtype=object))
        if out["source"].shape != (n,):
            raise DatasetError(f"source: expected {n} values, got shape {list(out['source'].shape)}")
        return out

    def to_table(self, rows: dict[str, np.ndarray]) -> pa.Table:
        """Checked numpy columns (from `check_batch`) → an Arrow table in the contract's schema."""
        n = len(rows["id"])
        image = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(self.image_nbytes), n, [None, pa.py_buffer(rows["image"])])
        arrays = [pa.array(rows["id"], pa.string()), image]
        arrays += [pa.FixedSizeListArray.from_arrays(pa.array(rows[name].ravel()), self.label_size(name))
                   for name in self.label_fields]
        arrays.append(pa.array(rows["source"], pa.string()))
        return pa.Table.from_arrays(arrays, schema=self.arrow_schema())


@dataclass
class ShardInfo:
    path: str  # relative to the dataset prefix
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    rows: int
    shards: list[ShardInfo]
    image_shape: list[int]
    image_dtype: str
    label_fields: dict[str, list[int]]
    kind: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def layout(self) -> Layout:
        return Layout(tuple(self.image_shape), self.image_dtype, dict(self.label_fields))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, uri: str, name: str = MANIFEST_NAME) -> Manifest:
        where = storage.join(uri, name)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DatasetError(f"{where}: not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{where}: format_version {data.get('format_version')!r} is not supported "
                               f"(this version reads {FORMAT_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"extra", "created"}
        if missing:
            raise DatasetError(f"{where}: missing field(s) {sorted(missing)}")
        unknown = set(data) - names
        if unknown:
            raise DatasetError(f"{where}: unknown field(s) {sorted(unknown)}")
        try:
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            manifest = cls(**data)
            _ = manifest.layout  # validates shape, dtype and label names
        except (TypeError, ValueError) as exc:  # ValueError: int("x") in a shape; DatasetError is one too
            raise DatasetError(f"{where}: {exc}") from exc
        seen = set()
        for shard in manifest.shards:
            # Checked before any file is touched: a hostile path never reaches the filesystem.
            if not isinstance(shard.path, str) or not SHARD_PATH.fullmatch(shard.path):
                raise DatasetError(f"{where}: shard path {shard.path!r} is not a shard name inside the dataset "
                                   "(like part-00000.parquet)")
            if shard.path in seen:
                raise DatasetError(f"{where}: shard {shard.path!r} is listed twice")
            if not all(type(n) is int and n >= 0 for n in (shard.rows, shard.bytes)) or \
                    not isinstance(shard.sha256, str):
                raise DatasetError(f"{where}: shard {shard.path!r}: rows and bytes must be counts, sha256 a string")
            seen.add(shard.path)
        if type(manifest.rows) is not int or sum(s.rows for s in manifest.shards) != manifest.rows:
            raise DatasetError(f"{where}: rows={manifest.rows} but the shards hold "
                               f"{sum(s.rows for s in manifest.shards)}")
        return manifest


def read_manifest_bytes(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[str, bytes]:
    """(file name, bytes) of the dataset's manifest, today's name first, then the legacy one.

    A clear error when the prefix holds no finished dataset.
    """
    for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
        try:
            return name, storage.read_bytes(storage.join(uri, name), storage_cfg)
        except MissingFileError:
            continue
    storage.check_bucket(uri, storage_cfg)
    shards = [n for n in storage.list_files(uri, storage_cfg) if n.endswith(".parquet")]
    if shards:
        raise DatasetError(f"{uri}: incomplete dataset: {len(shards)} shard(s) but no {MANIFEST_NAME} "
                           "(the writer did not finish; write it again)")
    raise DatasetError(f"{uri}: no dataset here (no {MANIFEST_NAME})")


def manifest_sha256(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """The sha256 of the dataset's manifest bytes: what names this exact dataset (its shards' checksums
    are inside it)."""
    return hashlib.sha256(read_manifest_bytes(uri, storage_cfg)[1]).hexdigest()


def read_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> Manifest:
    """The dataset's manifest; a clear error when the prefix holds no finished dataset."""
    name, data = read_manifest_bytes(uri, storage_cfg)
    return Manifest.from_json(data.decode(errors="replace"), uri, name)


def shard_paths(uri: str, manifest: Manifest, storage_cfg: StorageConfig | None = None
                ) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the in-filesystem paths of every shard, in manifest order."""
    fs, base = storage.resolve(uri, storage_cfg)
    return fs, [f"{base}/{s.path}" for s in manifest.shards]


def _check_schema(schema: pa.Schema, layout: Layout, where: str) -> None:
    expected = layout.arrow_schema()
    for name in layout.columns:
        if name not in schema.names:
            raise DatasetError(f"{where}: column {name!r} is missing")
        got, want = schema.field(name).type, expected.field(name).type
        if got != want:
            raise DatasetError(f"{where}: column {name!r} has type {got}, the manifest says {want}")
    # A manifest that leaves out a label column the file holds would drop those labels silently.
    extra = [name for name in schema.names if name not in layout.columns]
    if extra:
        raise DatasetError(f"{where}: column(s) {extra} are not in the manifest")


_LOOKED_FOR_UNLISTED: set[str] = set()


def warn_unlisted(uri: str, manifest: Manifest, storage_cfg: StorageConfig | None = None) -> None:
    """Say (once per prefix and process) which shard files beside the manifest it does not list:
    our readers skip them but pandas and other plain readers would read them as rows."""
    if uri in _LOOKED_FOR_UNLISTED:
        return
    _LOOKED_FOR_UNLISTED.add(uri)
    listed = {s.path for s in manifest.shards}
    unlisted = [n for n in storage.list_files(uri, storage_cfg) if is_shard_name(n) and n not in listed]
    if unlisted:
        print(f"warning: {uri}: {len(unlisted)} file(s) not listed in its manifest, which plain Parquet readers "
              f"would read as rows: {', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}",
              file=sys.stderr)


def check_unique_ids(uri: str, ids: list[tuple[str, pa.ChunkedArray]]) -> None:
    """Ids must be unique across the whole dataset: (shard path, id column) of every shard read."""
    column = pa.chunked_array([chunk for _, c in ids for chunk in c.chunks], pa.string())
    if pc.count_distinct(column).as_py() == len(column):
        return
    first: dict[str, str] = {}
    for path, c in ids:
        for value in c.to_pylist():
            if value in first:
                raise DatasetError(f"{uri}: id {value!r} appears twice, in {first[value]} and in {path}")
            first[value] = path


def validate(uri: str, storage_cfg: StorageConfig | None = None, verify_checksums: bool = False) -> Manifest:
    """Check every shard against the manifest: present, same size, row count, schema and unique ids.

    Sizes, Parquet footers and id columns cost a few small requests per shard;
    `verify_checksums` reads every byte and compares sha256 as well.
    """
    manifest = read_manifest(uri, storage_cfg)
    warn_unlisted(uri, manifest, storage_cfg)
    layout = manifest.layout
    ids = []
    fs, paths = shard_paths(uri, manifest, storage_cfg)
    try:
        infos = fs.get_file_info(paths)
    except OSError as exc:
        raise storage.explain(exc, uri, "list the shards") from exc
    for shard, info, path in zip(manifest.shards, infos, paths, strict=True):
        where = storage.join(uri, shard.path)
        if info.type != pafs.FileType.File:
            raise DatasetError(f"{where}: shard listed in the manifest is missing")
        if info.size != shard.bytes:
            raise DatasetError(f"{where}: {info.size} bytes, the manifest says {shard.bytes} (corrupt or replaced)")
        if verify_checksums:
            ids.append((shard.path, _decode_shard(fs, path, shard, layout, where, columns=["id"]).column("id")))
            continue
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                if parquet.metadata.num_rows != shard.rows:
                    raise DatasetError(f"{where}: {parquet.metadata.num_rows} rows, the manifest says {shard.rows}")
                _check_schema(parquet.schema_arrow, layout, where)
                ids.append((shard.path, parquet.read(columns=["id"]).column("id")))
        except (OSError, pa.ArrowInvalid) as exc:
            raise DatasetError(f"{where}: not a readable Parquet file ({exc})") from exc
    check_unique_ids(uri, ids)
    return manifest


def _decode_shard(fs: pafs.FileSystem, path: str, shard: ShardInfo, layout: Layout, where: str,
                  columns: list[str]) -> pa.Table:
    try:
        with fs.open_input_stream(path) as f:
            data = f.readall()
    except FileNotFoundError as exc:
        raise DatasetError(f"{where}: shard listed in the manifest is missing") from exc
    except OSError as exc:
        raise storage.explain(exc, where, "read") from exc
    if len(data) != shard.bytes:
        raise DatasetError(f"{where}: {len(data)} bytes, the manifest says {shard.bytes} (corrupt or replaced)")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DatasetError(f"{where}: sha256 does not match the manifest (corrupt shard)")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        _check_schema(parquet.schema_arrow, layout, where)
        table = parquet.read(columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"{where}: not a readable Parquet file ({exc})") from exc
    if parquet.metadata.num_rows != shard.rows:
        raise DatasetError(f"{where}: {parquet.metadata.num_rows} rows, the manifest says {shard.rows}")
    return table


def load_numpy(uri: str, storage_cfg: StorageConfig | None = None, columns: list[str] | None = None,
               limit: int | None = None, only_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Read a whole dataset (or its first `limit` rows) into memory, checking every shard.

    With `only_ids`, just the rows of those ids (in dataset order): each shard is filtered as it
    is read, so memory holds one shard plus the kept rows, and only those are decoded.

    For single-process users (local training, evaluation, tests); clusters stream
    with `simgan_dist.data.pipeline.read_dataset`. Images come back N×H×W×C in
    their stored dtype, labels float32 N×shape, `id`/`source` as object arrays.
    """
    manifest = read_manifest(uri, storage_cfg)
    warn_unlisted(uri, manifest, storage_cfg)
    layout = manifest.layout
    columns = list(layout.columns if columns is None else columns)
    unknown = [c for c in columns if c not in layout.columns]
    if unknown:
        raise DatasetError(f"{uri}: no column(s) {unknown}; the dataset has {layout.columns}")
    fs, paths = shard_paths(uri, manifest, storage_cfg)
    want = manifest.rows if limit is None else min(limit, manifest.rows)
    read = columns if "id" in columns else ["id", *columns]  # ids are always checked: they are small
    keep = None if only_ids is None else pa.array(only_ids, pa.string())
    tables, ids, got = [], [], 0
    for shard, path in zip(manifest.shards, paths, strict=True):
        if got >= want:
            break
        table = _decode_shard(fs, path, shard, layout, storage.join(uri, shard.path), read).slice(0, want - got)
        ids.append((shard.path, table.column("id")))
        got += table.num_rows
        if keep is not None:
            table = table.filter(pc.is_in(table.column("id"), value_set=keep))
        tables.append(table.select(columns))
    check_unique_ids(uri, ids)
    if not tables:
        tables = [layout.arrow_schema().empty_table().select(columns)]
    parts = [decode_table(t, layout) for t in tables]
    return {name: np.concatenate([p[name] for p in parts]) for name in columns}
