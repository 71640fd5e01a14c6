"""S3 faults against a real endpoint: the loopback S3 server behind a fault-injecting proxy
(tests/s3_faults.py: 503 SlowDown, 500 InternalError, dropped connections, stalled bodies), with
the storage layer, simulate, ingest, train and refine pointed at the proxy (`storage.endpoint_url`).

Fewer faults per request than the storage layer's attempts (storage.MAX_ATTEMPTS) must leave
exactly what a fault-free run writes; a persistent fault must end in one clear error line and
no `_manifest.json`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image
from s3_faults import FaultProxy

from simgan_dist import cli
from simgan_dist.config import load_config
from simgan_dist.data import storage
from simgan_dist.data.schema import MANIFEST_NAME, read_manifest
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.data.storage import MAX_ATTEMPTS, StorageError

pytestmark = pytest.mark.slow

SPLITS = ("synthetic", "real", "real_test")
ANSWERED = "the storage endpoint answered with an error"
DROPPED = "the storage endpoint dropped or stalled the request"


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server) as running:
        yield running


def via(proxy: FaultProxy, *overrides: str):
    return load_config("tiny", overrides=[f"storage.endpoint_url={proxy.endpoint}", *overrides])


def cli_sets(proxy: FaultProxy, *overrides: str) -> list[str]:
    return ["--preset", "tiny", *(a for o in (f"storage.endpoint_url={proxy.endpoint}", *overrides)
                                  for a in ("--set", o))]


def one_clear_error(err: str, command: str, *parts: str) -> None:
    """The command's error line says what failed, with no traceback (Ray's or ours)."""
    assert "Traceback" not in err and 'File "' not in err, err
    line = next(line for line in err.splitlines() if line.startswith(f"simgan-dist {command}: error: "))
    for part in parts:
        assert part in line, (part, line)


def shards(uri: str) -> list:
    return read_manifest(uri).shards


# --- the storage layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, hint", [("slowdown", ANSWERED), ("internal", ANSWERED), ("drop", DROPPED)])
def test_each_request_is_tried_max_attempts_times(kind, hint, s3_bucket, proxy):
    cfg = via(proxy).storage
    uri, data = f"{s3_bucket}/f/data.bin", os.urandom(4096)
    proxy.inject(kind, method="PUT", path=r"/f/data\.bin$", times=MAX_ATTEMPTS - 1)
    storage.write_bytes_atomic(uri, data, cfg)
    proxy.inject(kind, method="GET", path=r"/f/data\.bin$", times=MAX_ATTEMPTS - 1)
    assert storage.read_bytes(uri, cfg) == data
    assert proxy.hits() == 2 * (MAX_ATTEMPTS - 1)
    proxy.inject(kind, method="GET", path=r"/f/data\.bin$", times=MAX_ATTEMPTS)
    with pytest.raises(StorageError, match=f"{uri}: cannot read: {hint}"):
        storage.read_bytes(uri, cfg)
    assert proxy.hits() == 3 * MAX_ATTEMPTS - 2


def test_a_stall_past_the_read_timeout_is_retried(s3_bucket, proxy):
    cfg = via(proxy).storage
    uri = f"{s3_bucket}/f/data.bin"
    storage.write_bytes_atomic(uri, b"x" * 4096, cfg)
    # The AWS SDK gives up on a response that sends nothing for 3 s and asks again.
    proxy.inject("stall", method="GET", path=r"/f/data\.bin$", stall_s=4.0)
    assert storage.read_bytes(uri, cfg) == b"x" * 4096
    assert proxy.hits("stall") == 1 and proxy.requests.count(("GET", uri[len("s3:/"):])) == 2


def test_a_5xx_on_a_read_smaller_than_the_error_document_is_not_retried(s3_bucket, proxy):
    """A known limit of pyarrow's S3 client: it reads into a buffer of exactly the bytes asked for,
    S3's error document (~250 bytes) does not fit, and the AWS SDK then reports a non-retried
    INTERNAL_FAILURE. Ray Data's reads and Ray Train's uploads retry it themselves; this test
    tells when pyarrow stops needing that (docs/RELIABILITY.md)."""
    cfg = via(proxy).storage
    uri = f"{s3_bucket}/f/tiny.json"
    storage.write_bytes_atomic(uri, b"{}", cfg)
    proxy.inject("slowdown", method="GET", path=r"/f/tiny\.json$", times=MAX_ATTEMPTS)
    with pytest.raises(StorageError, match=f"{uri}: cannot read: {ANSWERED}"):
        storage.read_bytes(uri, cfg)
    assert proxy.hits() == 1


def test_filesystems_pickled_into_ray_tasks_keep_the_retry_policy(ray_local, s3_bucket, proxy, monkeypatch):
    """pyarrow does not pickle an S3FileSystem's retry strategy: the copies Ray Data's read tasks and
    Ray Train's uploads use must still retry as storage.py says, not by pyarrow's default."""
    uri = f"{s3_bucket}/f/data.bin"
    storage.write_bytes_atomic(uri, b"x" * 4096)
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", MAX_ATTEMPTS + 2)  # pyarrow's own default is 3
    filesystem, path = storage.resolve(uri, via(proxy).storage)

    @ray_local.remote
    def read(fs: pafs.FileSystem, path: str) -> str:
        try:
            with fs.open_input_stream(path) as f:
                return f"read {len(f.readall())} bytes"
        except OSError as exc:
            return str(exc)

    proxy.inject("drop", method="GET", path=r"/f/data\.bin$", times=100)
    assert "Empty reply from server" in ray_local.get(read.remote(filesystem, path))
    assert proxy.hits() == MAX_ATTEMPTS + 2


# --- simulate ---------------------------------------------------------------------------------------------


def test_simulate_rides_out_transient_faults(ray_local, s3_bucket, proxy):
    # Shards are written to a staging folder and copied up at commit (writer.commit).
    proxy.inject("slowdown", method="PUT", path=r"/synthetic/_staging-\w+/part-00000\.parquet$", times=2)
    proxy.inject("drop", method="PUT", path=r"/synthetic/_staging-\w+/part-00001\.parquet$", times=2)
    proxy.inject("internal", method="POST", path=r"/real/_manifest\.json$", times=2)
    # 5 shards: Ray tasks write them (parallel), the driver writes the manifests
    simulate_dataset(f"{s3_bucket}/faulty", 300, 100, 50, seed=2, rows_per_shard=100, storage_cfg=via(proxy).storage)
    assert proxy.hits() == 6
    simulate_dataset(f"{s3_bucket}/clean", 300, 100, 50, seed=2, rows_per_shard=100)
    for split in SPLITS:
        assert shards(f"{s3_bucket}/faulty/{split}") == shards(f"{s3_bucket}/clean/{split}")


def test_simulate_under_a_persistent_fault_fails_clearly_without_a_manifest(ray_local, s3_bucket, proxy, capsys):
    out = f"{s3_bucket}/persistent"
    proxy.inject("slowdown", method="PUT", path=r"/real/_staging-\w+/part-00000\.parquet$", times=100)
    assert cli.main(["simulate", "--out", out, "--synthetic", "200", "--real", "100", "--real-test", "0",
                     "--rows-per-shard", "100", *cli_sets(proxy)]) == 1
    one_clear_error(capsys.readouterr().err, "simulate", f"{out}/real/_staging-", "/part-00000.parquet: cannot write: "
                    f"{ANSWERED}", "SLOW_DOWN")
    assert proxy.hits() == MAX_ATTEMPTS
    for split in SPLITS:
        assert MANIFEST_NAME not in storage.list_files(f"{out}/{split}")


# --- ingest -----------------------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path):
    """Six eye-sized photos and one corrupt file (quarantined)."""
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (35, 55), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_ingest_rides_out_transient_faults(photos, s3_bucket, proxy):
    from simgan_dist.data.ingest import QUARANTINE_NAME, ingest

    proxy.inject("stall", method="GET", path=r"^/[^/]+$", stall_s=4.0)  # the listing of the output prefix
    proxy.inject("slowdown", method="PUT", path=r"/faulty/_staging-\w+/part-00000\.parquet$", times=2)
    proxy.inject("drop", method="POST", path=r"/faulty/_staging-\w+/_quarantine/quarantine\.parquet$", times=2)
    proxy.inject("internal", method="POST", path=r"/faulty/_manifest\.json$", times=2)
    ingest("folder", photos, f"{s3_bucket}/faulty", cfg=via(proxy), rows_per_shard=2, workers=1)
    assert proxy.hits() == 7
    ingest("folder", photos, f"{s3_bucket}/clean", rows_per_shard=2, workers=1)
    assert len(shards(f"{s3_bucket}/faulty")) == 3
    assert shards(f"{s3_bucket}/faulty") == shards(f"{s3_bucket}/clean")
    assert (storage.read_bytes(f"{s3_bucket}/faulty/{QUARANTINE_NAME}")
            == storage.read_bytes(f"{s3_bucket}/clean/{QUARANTINE_NAME}"))


def test_ingest_under_a_persistent_fault_fails_clearly_without_a_manifest(photos, s3_bucket, proxy, capsys):
    out = f"{s3_bucket}/persistent"
    proxy.inject("drop", method="PUT", path=r"/persistent/_staging-\w+/part-00001\.parquet$", times=100)
    assert cli.main(["ingest", "folder", str(photos), "--out", out, "--rows-per-shard", "2", "--workers", "1",
                     *cli_sets(proxy)]) == 1
    one_clear_error(capsys.readouterr().err, "ingest", f"{out}/_staging-",
                    f"/part-00001.parquet: cannot write: {DROPPED}")
    assert proxy.hits() == MAX_ATTEMPTS
    assert MANIFEST_NAME not in storage.list_files(out)


# --- refine -----------------------------------------------------------------------------------------------

REFINE = ["refine.rows_per_shard=100", "refine.min_actors=1", "refine.max_actors=1", "refine.batch_size=100"]


@pytest.fixture
def refine_job(ray_local, s3_bucket, tmp_path):
    """(a checkpoint, an S3 corpus of 2 input shards cut into 4 output shards, its fault-free refinement)."""
    import torch

    from simgan_dist.core.models import build_discriminator, build_refiner
    from simgan_dist.refine import refine
    from simgan_dist.train.checkpoint import write_checkpoint

    cfg = load_config("tiny", overrides=REFINE)
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "ckpt", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    simulate_dataset(f"{s3_bucket}/eyes", 300, 0, 0, seed=4, rows_per_shard=150, parallel=False)
    refine(str(tmp_path / "ckpt"), f"{s3_bucket}/eyes/synthetic", f"{s3_bucket}/clean", cfg, progress=False)
    return str(tmp_path / "ckpt"), f"{s3_bucket}/eyes/synthetic", f"{s3_bucket}/clean"


def test_refine_rides_out_transient_faults(refine_job, s3_bucket, proxy):
    from simgan_dist.refine import refine

    checkpoint, corpus, clean = refine_job
    proxy.inject("drop", method="GET", path=r"/eyes/synthetic/part-00000\.parquet$", times=2)
    proxy.inject("stall", method="GET", path=r"/eyes/synthetic/part-00001\.parquet$", stall_s=4.0)
    proxy.inject("slowdown", method="PUT", path=r"/faulty/part-00002\.parquet$", times=2)
    proxy.inject("internal", method="POST", path=r"/faulty/_manifest\.json$", times=2)
    refine(checkpoint, corpus, f"{s3_bucket}/faulty", via(proxy, *REFINE), progress=False)
    assert proxy.hits() == 7
    assert shards(f"{s3_bucket}/faulty") == shards(clean)


def test_refine_under_a_persistent_fault_fails_clearly_then_a_rerun_completes(refine_job, s3_bucket, proxy, capsys):
    checkpoint, corpus, clean = refine_job
    out = f"{s3_bucket}/persistent"
    proxy.inject("slowdown", method="PUT", path=r"/persistent/part-00001\.parquet$", times=100)
    args = ["refine", "--checkpoint", checkpoint, "--input", corpus, "--out", out, *cli_sets(proxy, *REFINE)]
    assert cli.main(args) == 1
    one_clear_error(capsys.readouterr().err, "refine", "1 bad shard(s): part-00001.parquet: "
                    f"{out}/part-00001.parquet: cannot write: {ANSWERED}", "no manifest written")
    assert proxy.hits() == MAX_ATTEMPTS
    names = storage.list_files(out)
    assert MANIFEST_NAME not in names and "part-00001.parquet" not in names
    assert {"part-00000.parquet", "part-00002.parquet", "part-00003.parquet"} <= set(names)  # the others got done
    proxy.clear()
    assert cli.main(args) == 0
    assert "50 of 300 rows refined" in capsys.readouterr().out  # the failed shard only
    assert shards(out) == shards(clean)


# --- train ------------------------------------------------------------------------------------------------

TRAIN = ["train.num_workers=1", "train.pretrain_refiner_steps=2", "train.pretrain_disc_steps=2", "train.iterations=4",
         "train.checkpoint_every=4", "train.report_every=4", "train.image_every=100", "train.shuffle=false",
         "train.buffer_shards=1", "train.max_failures=0"]


@pytest.fixture
def train_data(ray_local, s3_bucket):
    simulate_dataset(f"{s3_bucket}/eyes", 64, 32, 0, seed=5, rows_per_shard=32, parallel=False)
    return [*TRAIN, f"data.synthetic={s3_bucket}/eyes/synthetic", f"data.real={s3_bucket}/eyes/real",
            f"train.storage_path={s3_bucket}/runs"]


def checkpoint_files(uri: str) -> dict[str, int]:
    """Every file of a checkpoint folder (relative name → size)."""
    fs, base = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return {info.path[len(base) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}


def test_train_rides_out_transient_faults_and_a_restart(train_data, s3_bucket, proxy):
    """Two workers with shuffled reads sharing two history shards, under train.deterministic (the tiny
    preset's default): a run that meets transient faults, stops halfway and is submitted again gives
    the bits of a fault-free run straight through. The resumed run goes on where its checkpoint stopped:
    at its place in each data stream (the shuffled rows left of a chunk) and with the history sample
    drawn before it (otherwise the bits differ). That also shows such runs are reproducible; without
    train.deterministic two of them differ (Ray Data's block order and the shards' arrival order vary;
    bench/RESULTS.md, issue 23)."""
    from simgan_dist.train.driver import checkpoint_uri, fit

    train_data = [*train_data, "train.num_workers=2", "train.shuffle=true", "train.buffer_shards=2",
                  "train.batch_size=16"]
    cfg = load_config("tiny", overrides=[*train_data, "train.name=clean"])
    assert cfg.train.deterministic
    clean = checkpoint_uri(cfg, fit(cfg).checkpoint)
    # data reads (Ray Data's read tasks), checkpoint uploads (Ray Train) and the monitor's mirror
    proxy.inject("drop", method="GET", path=r"/eyes/synthetic/part-00000\.parquet$", times=2)
    proxy.inject("slowdown", method="GET", path=r"/eyes/real/part-00000\.parquet$", times=2)
    proxy.inject("slowdown", method="PUT", path=r"/runs/faulty/checkpoint_[^/]+/refiner\.pt$", times=2)
    proxy.inject("internal", method="POST", path=r"/runs/faulty/checkpoint_[^/]+/state\.pt$", times=2)
    proxy.inject("drop", method="PUT", path=r"/runs/faulty/monitor/metrics\.jsonl$", times=2)
    half = fit(via(proxy, *train_data, "train.name=faulty", "train.iterations=2"))
    assert half.metrics["step"] == 6
    cfg = via(proxy, *train_data, "train.name=faulty")
    result = fit(cfg)
    assert proxy.hits() == 10
    assert result.metrics["step"] == 8 and result.metrics["restored_from_step"] == 6
    faulty = checkpoint_uri(cfg, result.checkpoint)
    files, reference = checkpoint_files(faulty), checkpoint_files(clean)
    del files["config.yaml"], reference["config.yaml"]  # it names the run and its endpoint
    assert files == reference and "position_rank1.pt" in files
    for name in ("refiner.pt", "discriminator.pt"):  # the same weights as the fault-free run
        assert storage.read_bytes(f"{faulty}/{name}") == storage.read_bytes(f"{clean}/{name}")
    lines = storage.read_bytes(f"{s3_bucket}/runs/faulty/monitor/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 6, 8]


def test_train_under_a_persistent_upload_fault_fails_clearly(train_data, s3_bucket, proxy, capsys):
    from simgan_dist.train.checkpoint import CheckpointError, load_refiner

    proxy.inject("slowdown", method="POST", path=r"/runs/persistent/checkpoint_[^/]+/refiner\.pt$", times=1000)
    assert cli.main(["train", *cli_sets(proxy, *train_data, "train.name=persistent")]) == 1
    one_clear_error(capsys.readouterr().err, "train", "run 'persistent' failed: OSError: When initiating multiple "
                    "part upload for key 'runs/persistent/checkpoint_", "refiner.pt", "SLOW_DOWN",
                    f"continues it from its latest checkpoint in {s3_bucket}/runs/persistent")
    assert proxy.hits() >= MAX_ATTEMPTS  # Ray Train tries the upload a few times more
    # Ray Train registered no checkpoint; the folder it was uploading is refused as incomplete
    run = f"{s3_bucket}/runs/persistent"
    try:
        registered = storage.read_bytes(f"{run}/checkpoint_manager_snapshot.json").decode()
    except storage.MissingFileError:
        registered = ""
    assert "checkpoint_" not in registered
    fs, base = storage.resolve(run)
    for info in fs.get_file_info(pafs.FileSelector(base)):
        if info.base_name.startswith("checkpoint_") and info.type == pafs.FileType.Directory:
            with pytest.raises(CheckpointError, match="is not a complete simgan_dist checkpoint"):
                load_refiner(f"{run}/{info.base_name}")
