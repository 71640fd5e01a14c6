"""Which region an S3 filesystem signs for. AWS itself cannot be reached from the test machines, so the
one call that asks AWS (`pyarrow.fs.resolve_s3_region`) is replaced by a recorder; everything else is real."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from simgan_dist.config import StorageConfig
from simgan_dist.data import storage

AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture
def asked(monkeypatch):
    """On AWS (no endpoint, no region anywhere); records which buckets' regions were looked up."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    buckets: list[str] = []

    def resolve_s3_region(bucket: str) -> str:
        buckets.append(bucket)
        return {"eu-bucket": "eu-central-1"}.get(bucket, "us-east-1")

    monkeypatch.setattr(pafs, "resolve_s3_region", resolve_s3_region)
    storage.bucket_region.cache_clear()
    yield buckets
    storage.bucket_region.cache_clear()


def test_an_aws_bucket_gets_its_own_region_looked_up_once(asked):
    fs, path = storage.resolve("s3://eu-bucket/runs/x")
    assert fs.region == "eu-central-1" and path == "eu-bucket/runs/x"
    storage.resolve("s3://eu-bucket/other")
    assert asked == ["eu-bucket"]  # cached per process


def test_a_configured_region_or_endpoint_means_no_lookup(asked, monkeypatch):
    assert storage.resolve("s3://eu-bucket/x", StorageConfig(region="ap-south-1"))[0].region == "ap-south-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # S3-compatible storage: nothing to ask AWS
    assert storage.resolve("s3://eu-bucket/x")[0].region == storage.DEFAULT_REGION
    assert asked == []


def test_a_failed_lookup_says_what_to_set(asked, monkeypatch):
    def unreachable(bucket: str) -> str:
        raise OSError("When resolving region for bucket: curlCode 6, could not resolve host")

    monkeypatch.setattr(pafs, "resolve_s3_region", unreachable)
    with pytest.raises(storage.StorageError, match="storage.region"):
        storage.resolve("s3://nowhere/x")
