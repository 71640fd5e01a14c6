"""URI resolution and storage errors, against a real S3 endpoint on loopback (moto server)."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pyarrow.fs as pafs
import pytest

from simgan_dist.config import StorageConfig
from simgan_dist.data import storage
from simgan_dist.data.schema import DatasetError, read_manifest
from simgan_dist.data.storage import StorageError


def test_resolve_local_and_file_uris(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "a" / "b/"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a" / "b")
    _, path = storage.resolve(f"file://{tmp_path}/x")
    assert path == f"{tmp_path}/x"
    with pytest.raises(StorageError, match="gs://b/x: unsupported URI scheme"):
        storage.resolve("gs://b/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.resolve("s3://")


def test_join_keeps_the_scheme():
    assert storage.join("s3://b/p/", "real", "/part-00000.parquet") == "s3://b/p/real/part-00000.parquet"
    assert storage.join("/data", "synthetic") == "/data/synthetic"


@pytest.mark.slow
def test_s3_filesystem_uses_config_over_environment(s3_server):
    cfg = StorageConfig(endpoint_url="https://minio.example:9000", region="eu-west-1")
    fs, path = storage.resolve("s3://bucket/prefix/", cfg)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/prefix"
    assert fs.region == "eu-west-1"
    effective = storage.effective_config(StorageConfig(region="eu-west-1"))
    assert effective.endpoint_url == s3_server and effective.access_key_id == "testing"
    assert effective.region == "eu-west-1"


def test_atomic_write_local_leaves_no_temporary_files(tmp_path):
    uri = str(tmp_path / "deep" / "file.json")
    storage.write_bytes_atomic(uri, b"one")
    storage.write_bytes_atomic(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert os.listdir(tmp_path / "deep") == ["file.json"]


@pytest.mark.slow
def test_s3_roundtrip_list_and_delete(s3_bucket):
    uri = storage.join(s3_bucket, "dir", "x.bin")
    storage.write_bytes_atomic(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload"
    assert storage.list_files(storage.join(s3_bucket, "dir")) == ["x.bin"]
    storage.delete_files(storage.join(s3_bucket, "dir"), ["x.bin", "missing.bin"])
    assert storage.list_files(storage.join(s3_bucket, "dir")) == []
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(uri)


@pytest.mark.slow
def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        read_manifest("s3://no-such-bucket/eyes/synthetic")
    with pytest.raises(StorageError, match="does not exist"):
        storage.write_bytes_atomic("s3://no-such-bucket/x.bin", b"1")


@pytest.mark.slow
def test_empty_prefix_is_not_a_dataset(s3_bucket):
    with pytest.raises(DatasetError, match="no dataset here"):
        read_manifest(storage.join(s3_bucket, "nothing"))


def _set_moto_auth(endpoint: str, free_requests: str) -> None:
    # Moto accepts any key until told to authenticate ("0": from the next request on).
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=free_requests.encode(),
                                     headers={"Content-Type": "text/plain"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()


@pytest.mark.slow
def test_wrong_credentials_say_access_denied(s3_bucket, s3_server):
    storage.write_bytes_atomic(storage.join(s3_bucket, "x.bin"), b"1")
    bad = StorageConfig(access_key_id="AKIAWRONGWRONGWRONG0", secret_access_key="wrong")
    _set_moto_auth(s3_server, "0")
    try:
        with pytest.raises(StorageError, match="access denied: check the credentials"):
            storage.read_bytes(storage.join(s3_bucket, "x.bin"), bad)
        with pytest.raises(StorageError, match="access denied"):
            storage.write_bytes_atomic(storage.join(s3_bucket, "y.bin"), b"1", bad)
    finally:
        _set_moto_auth(s3_server, "inf")


def test_unreachable_endpoint_fails_fast():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s")
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
        read_manifest("s3://bucket/eyes", cfg)
    assert time.monotonic() - start < 15
