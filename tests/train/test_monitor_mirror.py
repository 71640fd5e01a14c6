"""The monitor folder's mirror to object storage (loopback S3): background, changed files only, and a
restarted run appends to the metrics.jsonl already there."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simgan_dist.data import storage
from simgan_dist.train.monitor import FolderMirror, RunLog

pytestmark = pytest.mark.slow  # the S3 server


def _steps(uri: str) -> list[int]:
    return [json.loads(line)["step"] for line in storage.read_bytes(f"{uri}/metrics.jsonl").decode().splitlines()]


def test_mirror_sends_changed_files_only_and_a_restart_appends(s3_bucket, tmp_path):
    remote = f"{s3_bucket}/runs/r/monitor"
    mirror = FolderMirror(tmp_path / "a", remote)
    assert mirror.restore() == 0  # nothing there yet
    log = RunLog(mirror.folder)
    log.write(1, {"loss": 1.0})
    log.image(1, np.zeros((4, 4), np.uint8))
    log.tb.flush()
    first = mirror.push_changed()
    assert "metrics.jsonl" in first and "images/synthetic_refined_real_0000001.png" in first
    assert any(name.startswith("tensorboard/") for name in first)
    assert mirror.push_changed() == []  # nothing changed, nothing sent
    log.write(2, {"loss": 0.5})
    again = mirror.push_changed()  # the grown metrics.jsonl (and TensorBoard events), never the same image
    assert "metrics.jsonl" in again and not any(name.startswith("images/") for name in again)
    assert _steps(remote) == [1, 2]
    log.write(3, {"loss": 0.25})
    mirror.start()
    mirror.sync()  # returns at once; the thread uploads
    log.close()
    mirror.close()  # the final pass sends what was written before close
    assert _steps(remote) == [1, 2, 3]

    # A restarted run (fresh local folder, as on a new node) continues the remote file.
    again = FolderMirror(tmp_path / "b", remote)
    assert again.restore() > 0
    log = RunLog(again.folder)
    log.write(4, {"loss": 0.2})
    log.close()
    again.close()
    assert _steps(remote) == [1, 2, 3, 4]
    assert len(storage.list_files(f"{remote}/images")) == 1


def test_tensorboard_flushes_on_the_mirror_thread_not_the_training_thread(s3_bucket):
    import threading

    from simgan_dist.config import load_config
    from simgan_dist.train.monitor import MonitorSink

    sink = MonitorSink(load_config("tiny", overrides=[f"train.storage_path={s3_bucket}/runs", "train.name=sink"]))
    flushed_on, flush = [], sink.log.tb.flush
    sink.log.tb.flush = lambda: (flushed_on.append(threading.current_thread().name), flush())
    sink.log.write(1, {"loss_of_r": 1.0})
    sink.sync()  # what the training thread calls at a report
    sink.close()
    assert flushed_on and set(flushed_on) == {"monitor-sync"}
    assert not sink.mirror.folder.exists()  # the local copy goes once everything is uploaded
    tensorboard = f"{s3_bucket}/runs/sink/monitor/tensorboard"
    events = storage.list_files(tensorboard)
    assert events and b"loss_of_r" in storage.read_bytes(f"{tensorboard}/{events[0]}")
