"""The Parquet contract: writer validation, manifest, readers that catch corruption."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simgan_dist.data import storage
from simgan_dist.data.decode import images_from_binary
from simgan_dist.data.schema import (
    MANIFEST_NAME,
    DatasetError,
    Layout,
    load_numpy,
    read_manifest,
    validate,
)
from simgan_dist.data.writer import DatasetWriter

LAYOUT = Layout((5, 7, 1), "uint8", {"gaze": (3,), "joints": (2, 3)})


def make_batch(start: int, n: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(start)
    return {
        "id": np.array([f"row-{i}" for i in range(start, start + n)], dtype=object),
        "image": rng.integers(0, 256, (n, 5, 7, 1), dtype=np.uint8),
        "gaze": rng.normal(size=(n, 3)).astype(np.float32),
        "joints": rng.normal(size=(n, 2, 3)),
    }


def write_dataset(uri: str, batches: list[dict], rows_per_shard: int = 10, **kw):
    with DatasetWriter(uri, LAYOUT, kind="synthetic", source="test", rows_per_shard=rows_per_shard, **kw) as w:
        for batch in batches:
            w.write(batch)
    return read_manifest(uri)


def test_roundtrip_shards_and_manifest(tmp_path):
    uri = str(tmp_path / "ds")
    batches = [make_batch(0, 7), make_batch(7, 18)]
    manifest = write_dataset(uri, batches, extra={"checkpoint": "runs/x"})
    assert manifest.rows == 25 and [s.rows for s in manifest.shards] == [10, 10, 5]
    assert [s.path for s in manifest.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest.image_shape == [5, 7, 1] and manifest.label_fields == {"gaze": [3], "joints": [2, 3]}
    assert manifest.kind == "synthetic" and manifest.extra == {"checkpoint": "runs/x"}

    data = load_numpy(uri)
    expected = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert data["image"].shape == (25, 5, 7, 1) and data["image"].dtype == np.uint8
    np.testing.assert_array_equal(data["image"], expected["image"])
    np.testing.assert_array_equal(data["gaze"], expected["gaze"])
    assert data["gaze"].dtype == np.float32
    np.testing.assert_allclose(data["joints"], expected["joints"], rtol=1e-6)
    assert list(data["id"]) == list(expected["id"]) and set(data["source"]) == {"test"}

    few = load_numpy(uri, columns=["id", "gaze"], limit=12)
    assert set(few) == {"id", "gaze"} and len(few["id"]) == 12 and few["id"][-1] == "row-11"
    assert validate(uri, verify_checksums=True).rows == 25


def test_plain_pyarrow_reads_the_shards(tmp_path):
    uri = str(tmp_path / "ds")
    batch = make_batch(0, 4)
    write_dataset(uri, [batch])
    table = pq.read_table(f"{uri}/part-00000.parquet")
    assert table.schema.field("image").type == pa.binary(35)
    assert table.schema.field("gaze").type == pa.list_(pa.float32(), 3)
    assert json.loads(table.schema.metadata[b"simgan_dist"])["image_shape"] == [5, 7, 1]
    frame = table.to_pandas()
    assert len(frame) == 4 and frame["id"].tolist() == list(batch["id"])
    image = np.frombuffer(frame["image"][2], np.uint8).reshape(5, 7, 1)
    np.testing.assert_array_equal(image, batch["image"][2])


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: b.update(image=b["image"][:, :4]), r"image: expected N x \[5, 7, 1\]"),
    (lambda b: b.update(image=b["image"].astype(np.uint16)), "image: expected dtype uint8, got uint16"),
    (lambda b: b.update(gaze=b["gaze"][:, :2]), r"gaze: expected shape \[3, 3\]"),
    (lambda b: b["gaze"].__setitem__((0, 0), np.nan), "gaze: labels contain NaN"),
    (lambda b: b.pop("joints"), "missing column 'joints'"),
    (lambda b: b.update(extra_label=b["gaze"]), r"unknown column\(s\) \['extra_label'\]"),
    (lambda b: b.update(id=b["id"][:2]), "id: expected 3 ids"),
    (lambda b: b["id"].__setitem__(1, "row-0"), "id: duplicate id 'row-0'"),
])
def test_writer_rejects_bad_batches(tmp_path, change, message):
    batch = make_batch(0, 3)
    change(batch)
    with pytest.raises(DatasetError, match=message):
        with DatasetWriter(str(tmp_path / "ds"), LAYOUT, kind="synthetic", source="t") as w:
            w.write(batch)
    # The failed write left no manifest: the prefix is visibly unfinished, not a smaller dataset.
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


def test_duplicate_ids_across_batches(tmp_path):
    with pytest.raises(DatasetError, match="duplicate id 'row-2'"):
        write_dataset(str(tmp_path / "ds"), [make_batch(0, 3), make_batch(2, 3)])


def test_unfinished_dataset_is_refused(tmp_path):
    uri = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="crash"):
        with DatasetWriter(uri, LAYOUT, kind="real", source="t", rows_per_shard=2) as w:
            w.write(make_batch(0, 5))
            raise RuntimeError("crash")
    with pytest.raises(DatasetError, match=r"no dataset here \(no _manifest.json\)"):
        load_numpy(uri)
    # Shards without a manifest (a write by an older version): refused too.
    write_dataset(uri, [make_batch(0, 5)])
    (tmp_path / "ds" / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetError, match=r"incomplete dataset: 1 shard\(s\) but no _manifest.json"):
        load_numpy(uri)


def test_existing_dataset_needs_overwrite(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_batch(0, 25)])
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetWriter(uri, LAYOUT, kind="synthetic", source="t")
    manifest = write_dataset(uri, [make_batch(100, 4)], overwrite=True)
    assert manifest.rows == 4 and storage.list_files(uri) == [MANIFEST_NAME, "part-00000.parquet"]


def test_corrupt_shard_same_size_fails_checksum(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_batch(0, 25)])
    shard = tmp_path / "ds" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="part-00001.parquet: sha256 does not match"):
        load_numpy(uri)
    with pytest.raises(DatasetError, match="part-00001.parquet: sha256"):
        validate(uri, verify_checksums=True)


def test_truncated_or_missing_shard_and_bad_manifest(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_batch(0, 25)])
    shard = tmp_path / "ds" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=r"part-00002.parquet: \d+ bytes, the manifest says"):
        validate(uri)
    shard.unlink()
    with pytest.raises(DatasetError, match="part-00002.parquet: shard listed in the manifest is missing"):
        validate(uri)

    path = tmp_path / "ds" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["rows"] = 26
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="rows=26 but the shards hold 25"):
        read_manifest(uri)
    manifest["rows"], manifest["image_dtype"] = 25, "float64"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="image_dtype must be one of"):
        read_manifest(uri)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        read_manifest(uri)


def test_shard_with_wrong_row_count_or_schema(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(uri, [make_batch(0, 25)])
    shard = tmp_path / "ds" / "part-00000.parquet"
    table = pq.read_table(shard)
    path = tmp_path / "ds" / MANIFEST_NAME
    manifest = json.loads(path.read_text())

    def replace_shard(new_table):
        pq.write_table(new_table, shard)
        manifest["shards"][0]["bytes"] = shard.stat().st_size
        path.write_text(json.dumps(manifest))

    replace_shard(table.slice(0, 9))
    with pytest.raises(DatasetError, match="part-00000.parquet: 9 rows, the manifest says 10"):
        validate(uri)
    replace_shard(table.drop_columns(["gaze"]))
    with pytest.raises(DatasetError, match="part-00000.parquet: column 'gaze' is missing"):
        validate(uri)


def test_images_from_binary_variants():
    images = np.arange(4 * 2 * 3, dtype=np.uint16).reshape(4, 2, 3, 1)
    arrow = pa.FixedSizeBinaryArray.from_buffers(pa.binary(12), 4, [None, pa.py_buffer(images)])
    np.testing.assert_array_equal(images_from_binary(arrow, (2, 3, 1), "uint16"), images)
    np.testing.assert_array_equal(images_from_binary(arrow.slice(1, 2), (2, 3, 1), "uint16"), images[1:3])
    chunked = pa.chunked_array([arrow.slice(0, 1), arrow.slice(1)])
    np.testing.assert_array_equal(images_from_binary(chunked, (2, 3, 1), np.uint16), images)
    as_objects = np.array([row.tobytes() for row in images], dtype=object)
    np.testing.assert_array_equal(images_from_binary(as_objects, (2, 3, 1), "uint16"), images)
    with pytest.raises(DatasetError, match=r"image: expected fixed_size_binary\(6\)"):
        images_from_binary(arrow, (2, 3, 1), "uint8")


def test_layout_rejects_bad_definitions():
    with pytest.raises(DatasetError, match=r"image_shape must be \[H, W, C\]"):
        Layout((35, 55))
    with pytest.raises(DatasetError, match="clashes with a built-in column"):
        Layout((1, 1, 1), "uint8", {"id": (1,)})


def test_a_5000_shard_dataset_validates_in_seconds(tmp_path):
    """What a 1.2M-row corpus of small shards looks like to `validate` (every shard's size, footer and
    ids, then uniqueness across all): linear in the shards, seconds on 2 cores. The bound is loose on
    purpose (a machine under load); a per-shard re-listing or a quadratic id check takes minutes."""
    import time

    uri = str(tmp_path / "many")
    write_dataset(uri, [make_batch(0, 10_000)], rows_per_shard=2)
    started = time.perf_counter()
    manifest = validate(uri)
    assert len(manifest.shards) == 5000 and manifest.rows == 10_000
    assert time.perf_counter() - started < 30
