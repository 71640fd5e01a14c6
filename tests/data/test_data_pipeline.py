"""Ray Data over the contract: exact counts from loopback S3, uint8 images, sharding, cycling, bad input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from simgan_dist.data import simulate, storage
from simgan_dist.data.schema import MANIFEST_NAME, DatasetError, load_numpy

pytest.importorskip("ray")
from simgan_dist.data.pipeline import read_dataset  # noqa: E402

pytestmark = pytest.mark.slow  # Ray Data over the S3 server


@pytest.fixture(scope="module")
def eyes(ray_local, s3_server):
    """A small simulated dataset in its own bucket, shared by this module's tests."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="pipeline-eyes")
    out = "s3://pipeline-eyes/eyes"
    simulate.simulate_dataset(out, 700, 260, 90, seed=11, rows_per_shard=200, parallel=False)
    return out


def test_torch_batches_from_s3_have_exact_counts_and_dtypes(eyes):
    import torch

    ds = read_dataset(storage.join(eyes, "synthetic"))
    assert ds.count() == 700
    rows, gaze = 0, []
    for batch in ds.iter_torch_batches(batch_size=128):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (35, 55, 1)
        assert batch["gaze"].dtype == torch.float32 and batch["gaze"].shape[1:] == (3,)
        assert set(batch) == {"image", "gaze", "pupil_xy", "head_pose"}
        rows += len(batch["image"])
        gaze.append(batch["gaze"].numpy())
    assert rows == 700
    expected = load_numpy(storage.join(eyes, "synthetic"), columns=["gaze"])["gaze"]
    np.testing.assert_array_equal(np.sort(np.concatenate(gaze), axis=0), np.sort(expected, axis=0))


def test_ids_and_images_match_the_written_rows(eyes):
    ds = read_dataset(storage.join(eyes, "real"), columns=["id", "image"])
    got = {}
    for batch in ds.iter_batches(batch_size=100, batch_format="numpy"):
        assert batch["image"].dtype == np.uint8
        got.update(zip(batch["id"], batch["image"], strict=True))
    expected = load_numpy(storage.join(eyes, "real"))
    assert len(got) == 260 and set(got) == set(expected["id"])
    for i in (0, 137, 259):
        np.testing.assert_array_equal(got[expected["id"][i]], expected["image"][i])


def test_unlabeled_real_has_only_images(eyes):
    ds = read_dataset(storage.join(eyes, "real"))
    batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    assert set(batch) == {"image"}
    with pytest.raises(DatasetError, match=r"no column\(s\) \['gaze'\]"):
        read_dataset(storage.join(eyes, "real"), columns=["image", "gaze"])


def test_per_worker_shards_split_the_rows(eyes):
    ds = read_dataset(storage.join(eyes, "synthetic"), columns=["id", "image"])
    # What Ray Train's get_dataset_shard hands each of two workers; the shards are read
    # concurrently, as workers do (a split waits for all of its consumers).
    shards = ds.streaming_split(2, equal=True)

    def consume(shard):
        return [i for batch in shard.iter_batches(batch_size=64, batch_format="numpy") for i in batch["id"]]

    with ThreadPoolExecutor(2) as pool:
        per_worker = list(pool.map(consume, shards))
    assert [len(ids) for ids in per_worker] == [350, 350]
    assert len(set(per_worker[0]) | set(per_worker[1])) == 700


def test_incomplete_or_corrupt_datasets_fail_before_reading(eyes, s3_bucket):
    with pytest.raises(DatasetError, match="no dataset here"):
        read_dataset(storage.join(s3_bucket, "nothing"))
    # Copy a shard without a manifest: an unfinished write.
    data = storage.read_bytes(storage.join(eyes, "real_test", "part-00000.parquet"))
    storage.write_bytes_atomic(storage.join(s3_bucket, "half", "part-00000.parquet"), data)
    with pytest.raises(DatasetError, match="incomplete dataset"):
        read_dataset(storage.join(s3_bucket, "half"))
    # A manifest whose shard was replaced by a truncated copy.
    manifest = storage.read_bytes(storage.join(eyes, "real_test", MANIFEST_NAME))
    storage.write_bytes_atomic(storage.join(s3_bucket, "cut", MANIFEST_NAME), manifest)
    storage.write_bytes_atomic(storage.join(s3_bucket, "cut", "part-00000.parquet"), data[:-100])
    with pytest.raises(DatasetError, match=r"cut/part-00000.parquet: \d+ bytes, the manifest says"):
        read_dataset(storage.join(s3_bucket, "cut"))
