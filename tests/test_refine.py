"""The batch refinement job against a real loopback S3 and a real local Ray cluster.

Exactly once: a job killed midway (SIGKILL of its driver) and rerun ends with every
input row exactly once, labels bit-identical, images equal to an in-process forward
of the same checkpoint; the shards the killed run finished are kept, not redone,
except one damaged afterwards, which the rerun detects and redoes.
Bad arguments fail before anything is written to the output prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from simgan_dist import cli
from simgan_dist.config import load_config
from simgan_dist.core.imaging import to_model_input, to_storage
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.data import storage
from simgan_dist.data.schema import MANIFEST_NAME, DatasetError, load_numpy, read_manifest
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.refine import JOB_FILE, refine
from simgan_dist.refine_shards import RefineError
from simgan_dist.train.checkpoint import load_refiner, write_checkpoint

pytestmark = pytest.mark.slow

# 3 input shards (3000, 3000, 2000 rows) cut into 6 + 6 + 4 output shards.
ROWS, INPUT_SHARD_ROWS, OUTPUT_SHARD_ROWS, OUTPUT_SHARDS = 8000, 3000, 500, 16
OVERRIDES = [f"refine.rows_per_shard={OUTPUT_SHARD_ROWS}", "refine.min_actors=1", "refine.max_actors=2",
             "refine.batch_size=200"]


def make_corpus(root: str, rows: int) -> str:
    simulate_dataset(root, rows, 0, 0, rows_per_shard=INPUT_SHARD_ROWS, parallel=False)
    return storage.join(root, "synthetic")


def make_checkpoint(folder, seed: int = 0, overrides: tuple[str, ...] = ()) -> str:
    cfg = load_config("tiny", overrides=list(overrides))
    torch.manual_seed(seed)
    write_checkpoint(folder, cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    return str(folder)


def shard_mtimes(uri: str) -> dict[str, float]:
    fs, base = storage.resolve(uri)
    infos = fs.get_file_info([f"{base}/{n}" for n in storage.list_files(uri) if n.startswith("part-")])
    return {info.base_name: info.mtime.timestamp() for info in infos}


def wait_for_shards(uri: str, proc: subprocess.Popen, minimum: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(shard_mtimes(uri)) < minimum:
        assert proc.poll() is None, f"refine exited early:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no output shards appeared"
        time.sleep(0.05)


def wait_until_quiet(uri: str, seconds: float = 2.0) -> dict[str, float]:
    """Shards written by actors still finishing after their driver died land before the rerun looks."""
    last, since = shard_mtimes(uri), time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.2)
        now = shard_mtimes(uri)
        if now != last:
            last, since = now, time.monotonic()
    return last


def reference_forward(checkpoint: str, images: np.ndarray) -> np.ndarray:
    refiner, _ = load_refiner(checkpoint)
    with torch.inference_mode():
        return to_storage(refiner(to_model_input(images)))


def test_refine_is_exact_and_resumes_after_kill(s3_bucket, ray_local, tmp_path):
    data = make_corpus(f"{s3_bucket}/data", ROWS)
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = f"{s3_bucket}/refined"

    # A driver that joins the test's Ray cluster, like `ray job submit`'s; SIGKILL takes its actors down too.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "simgan_dist.cli", "refine", "--checkpoint", checkpoint, "--input", data,
               "--out", out, "--preset", "tiny", *[a for o in OVERRIDES for a in ("--set", o)]]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_shards(out, proc, minimum=2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        printed = proc.communicate()[0]
    # Ray's "constructor arguments in the object store and max_restarts > 0" line: the actors are
    # restartable and built from inlined values (weights and credentials travel with each task).
    assert "core_worker" not in printed and "Traceback" not in printed, printed
    finished = wait_until_quiet(out)
    total = OUTPUT_SHARDS
    assert 2 <= len(finished) < total
    names = storage.list_files(out)
    assert JOB_FILE in names and MANIFEST_NAME not in names
    with pytest.raises(DatasetError, match="incomplete dataset"):
        read_manifest(out)
    # One finished shard is damaged afterwards (a torn copy): the rerun must notice and redo it.
    torn = min(finished)
    storage.write_bytes_atomic(storage.join(out, torn), storage.read_bytes(storage.join(out, torn))[:-100])
    kept = {name: mtime for name, mtime in finished.items() if name != torn}

    cfg = load_config("tiny", overrides=OVERRIDES)
    manifest = refine(checkpoint, data, out, cfg, progress=False)

    record = manifest.extra["refine"]
    assert record["exactness"]["verified"] and record["exactness"]["rows"] == ROWS
    assert (record["shards_reused"], record["shards_refined"]) == (len(kept), total - len(kept))
    assert record["checkpoint"] == checkpoint and record["input"] == data
    after = shard_mtimes(out)
    assert {name: after[name] for name in kept} == kept, "finished shards were written again"
    assert after[torn] > finished[torn]
    assert len(after) == len(manifest.shards) == total

    source, refined = load_numpy(data), load_numpy(out)  # load_numpy checks every shard's sha256
    assert manifest.rows == len(refined["id"]) == ROWS
    assert list(refined["id"]) == list(source["id"])
    assert len(set(refined["id"])) == ROWS
    for name in ("gaze", "pupil_xy", "head_pose"):
        assert refined[name].tobytes() == source[name].tobytes(), f"{name} labels changed"
    assert list(refined["source"]) == list(source["source"])
    assert np.mean(refined["image"] != source["image"]) > 0.5, "the refiner did not change the images"
    np.testing.assert_array_equal(refined["image"], reference_forward(checkpoint, source["image"]))

    # Rerunning a finished job is a no-op; another checkpoint into the same prefix is refused.
    assert refine(checkpoint, data, out, cfg, progress=False).to_json() == manifest.to_json()
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(RefineError, match="belongs to another refine job"):
        refine(other, data, out, cfg, progress=False)


@pytest.fixture
def corpus(s3_bucket, tmp_path):
    return make_corpus(f"{s3_bucket}/data", 300), make_checkpoint(tmp_path / "ckpt"), f"{s3_bucket}/refined"


def refuses(checkpoint: str, data: str, out: str, match: str) -> None:
    with pytest.raises(RefineError, match=match):
        refine(checkpoint, data, out, load_config("tiny"), progress=False)
    assert storage.list_files(out) == [], "output was written before the job was validated"


def test_bad_checkpoint_fails_before_output(corpus, s3_bucket, tmp_path):
    data, _, out = corpus
    refuses(str(tmp_path / "missing"), data, out, "checkpoint .* cannot be used.*config.yaml is missing")
    refuses(f"{s3_bucket}/no/such/checkpoint", data, out, "checkpoint .* cannot be used")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text(load_config("tiny").to_yaml())
    refuses(str(tmp_path / "half"), data, out, "refiner.pt is missing")


def test_shape_mismatch_fails_before_output(corpus, tmp_path):
    data, _, out = corpus
    hand = make_checkpoint(tmp_path / "hand", overrides=("model.image_height=36", "model.image_width=60"))
    refuses(hand, data, out, r"holds 35x55x1 \(HxWxC\) images but .* trained on 36x60x1")


def test_input_outside_the_contract_fails_before_output(corpus, s3_bucket):
    data, checkpoint, out = corpus
    loose = f"{s3_bucket}/loose"
    fs, base = storage.resolve(loose)
    with fs.open_output_stream(f"{base}/part-00000.parquet") as f:
        pq.write_table(pa.table({"id": ["a"], "image": [b"\0" * 1925]}), f)
    refuses(checkpoint, loose, out, "not a dataset in the simgan_dist contract.*no _manifest.json")
    refuses(checkpoint, f"{s3_bucket}/nothing", out, "no dataset here")

    wrong = f"{s3_bucket}/wrong_shape"
    for name in storage.list_files(data):
        payload = storage.read_bytes(storage.join(data, name))
        if name == MANIFEST_NAME:
            payload = json.dumps({**json.loads(payload), "image_shape": [36, 60, 1]}).encode()
        storage.write_bytes_atomic(storage.join(wrong, name), payload)
    refuses(checkpoint, wrong, out, "not a dataset in the simgan_dist contract.*column 'image' has type")


def test_output_prefix_must_be_free_and_reachable(corpus, s3_bucket, capsys):
    data, checkpoint, out = corpus
    before = storage.list_files(data)
    with pytest.raises(RefineError, match="is the input dataset itself"):
        refine(checkpoint, data, data, load_config("tiny"), progress=False)
    assert storage.list_files(data) == before
    storage.write_bytes_atomic(storage.join(out, "part-00000.parquet"), b"someone else's")
    with pytest.raises(RefineError, match="already holds files that no refine job wrote"):
        refine(checkpoint, data, out, load_config("tiny"), progress=False)
    assert storage.list_files(out) == ["part-00000.parquet"]

    code = cli.main(["refine", "--checkpoint", checkpoint, "--input", data, "--out", "s3://no-such-bucket-here/x",
                     "--preset", "tiny"])
    assert code == 1
    assert "bucket 'no-such-bucket-here' does not exist" in capsys.readouterr().err


def test_a_bit_flipped_input_shard_fails_the_job_naming_it(corpus, ray_local):
    """Issue 24 item 3: the actors hash the input shard they read; no manifest claims an exact result."""
    data, checkpoint, out = corpus
    manifest = read_manifest(data)
    shard = storage.join(data, manifest.shards[0].path)
    payload = bytearray(storage.read_bytes(shard))
    payload[len(payload) // 2] ^= 0x10  # image bytes: size, footer and row count still agree
    storage.write_bytes_atomic(shard, bytes(payload))
    with pytest.raises(RefineError, match=rf"not an exact refinement .*{shard}: .*sha256 does not match the "
                                          "input manifest"):
        refine(checkpoint, data, out, load_config("tiny", overrides=OVERRIDES[1:]), progress=False)
    assert MANIFEST_NAME not in storage.list_files(out)
