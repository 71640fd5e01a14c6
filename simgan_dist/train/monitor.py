"""What a user watches during training: progress lines, metrics.jsonl, TensorBoard, image grids."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from simgan_dist.config import Config
from simgan_dist.core.imaging import grid, save_png, to_host


class MetricAverager:
    """Accumulates detached metric tensors between reports; one host sync per report."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] += 1

    def pop(self) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        values = to_host(torch.stack([self.sums[k].float() for k in keys])).tolist()
        out = {k: v / self.counts[k] for k, v in zip(keys, values, strict=False)}
        self.sums.clear()
        self.counts.clear()
        return out


# (label, metric key, format): the two losses are named by their network, not both "loss".
PROGRESS_FIELDS = [
    ("R loss", "refiner/loss", "{:.4g}"),
    ("R adv", "refiner/adv_loss", "{:.4g}"),
    ("R reg", "refiner/reg_loss", "{:.4g}"),
    ("D loss", "disc/loss", "{:.4g}"),
]


def progress_line(step: int, total: int, phase: str, metrics: dict[str, float]) -> str:
    parts = [f"{label} {fmt.format(metrics[key])}" for label, key, fmt in PROGRESS_FIELDS if key in metrics]
    if "disc/acc_real" in metrics and "disc/acc_refined" in metrics:
        parts.append(f"D acc real/refined {metrics['disc/acc_real']:.2f}/{metrics['disc/acc_refined']:.2f}")
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:,.0f} img/s")
    if "data_wait_s" in metrics:
        parts.append(f"data wait {metrics['data_wait_s']:.2f} s")
    if "buffer_fill" in metrics:
        parts.append(f"buffer {metrics['buffer_fill']:.0%}")
    return f"[{step}/{total} {phase}] " + " | ".join(parts)


class RunLog:
    """metrics.jsonl and TensorBoard events in a local run folder, and the same to the run's MLflow
    run when it is tracked (`tracker`, tracking.py)."""

    def __init__(self, folder: str | Path, tracker=None):
        from torch.utils.tensorboard import SummaryWriter

        from simgan_dist.tracking import Tracker

        self.tracker = tracker or Tracker()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.folder / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(self.folder / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        self.tracker.metrics(step, metrics)

    def image(self, step: int, picture: np.ndarray, name: str = "synthetic_refined_real") -> Path:
        path = save_png(picture, self.folder / "images" / f"{name}_{step:07d}.png")
        self.tb.add_image(name, picture, step, dataformats="HW" if picture.ndim == 2 else "HWC")
        self.tracker.file(path, "images", what="image")
        return path

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def comparison_grid(synthetic: np.ndarray, refined: np.ndarray, real: np.ndarray | None, n: int = 8) -> np.ndarray:
    """Rows: synthetic | refined | real (N×H×W×C integer images); no real row before D has seen any."""
    rows = [synthetic[:n], refined[:n]] + ([real[:n]] if real is not None else [])
    return grid(rows)


class FolderMirror:
    """Copies a local run folder to object storage from a background thread, changed files only.

    `sync()` returns at once: the training step never waits on storage (`before_push`, e.g. the
    TensorBoard writer's flush, runs on this thread too). Files only grow
    (metrics.jsonl, TensorBoard events) or are new (image grids), so a file whose size is
    unchanged is not sent again. S3 cannot append, so `restore()` first brings back the
    `metrics.jsonl` an earlier attempt left there: a restarted run appends to it instead
    of replacing it with post-restart lines only.
    """

    APPEND_ONLY = "metrics.jsonl"

    def __init__(self, folder: str | Path, remote_uri: str, storage_cfg=None, before_push=None):
        self.folder = Path(folder)
        self.before_push = before_push
        self.remote = remote_uri
        self.storage_cfg = storage_cfg
        self.sent: dict[str, int] = {}
        self.uploads = 0
        self.wake = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="monitor-sync", daemon=True)

    def restore(self) -> int:
        """Bring the remote metrics.jsonl into the local folder (before anything is written); its bytes."""
        from simgan_dist.data import storage

        try:
            data = storage.read_bytes(storage.join(self.remote, self.APPEND_ONLY), self.storage_cfg)
        except storage.MissingFileError:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.APPEND_ONLY).write_bytes(data)
        self.sent[self.APPEND_ONLY] = len(data)
        return len(data)

    def start(self) -> FolderMirror:
        self.thread.start()
        return self

    def sync(self) -> None:
        self.wake.set()

    def close(self) -> None:
        """Send what is left and stop the thread."""
        self.closing = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join()
        else:
            self.push_changed()

    def push_changed(self) -> list[str]:
        """Upload every file that is new or grew since its last upload; returns their names."""
        from simgan_dist.data import storage

        if self.before_push:
            self.before_push()
        sent = []
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and ".tmp" not in p.name):
            name = path.relative_to(self.folder).as_posix()
            data = path.read_bytes()
            if self.sent.get(name) == len(data):
                continue
            storage.write_bytes_atomic(storage.join(self.remote, name), data, self.storage_cfg)
            self.sent[name] = len(data)
            sent.append(name)
        self.uploads += len(sent)
        return sent

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            final = self.closing  # read before the pass: files written during it go in one more pass
            try:
                self.push_changed()
            except Exception as exc:  # a storage hiccup must not stop training; the next sync retries
                print(f"monitor: upload to {self.remote} failed, retrying at the next report: {exc}",
                      file=sys.stderr)
            if final:
                return


class MonitorSink:
    """Rank 0's TensorBoard, metrics.jsonl and image grids, kept under `<storage>/<name>/monitor`.

    On S3 they are written to a local folder and mirrored by a background thread
    (`FolderMirror`), so no rank waits for uploads at a report.
    """

    def __init__(self, cfg: Config, tracker=None):
        from simgan_dist.data import storage

        remote = storage.join(cfg.train.storage_path, cfg.train.name, "monitor")
        self.mirror = None
        if storage.is_s3(remote):
            folder = tempfile.mkdtemp(prefix="simgan-monitor-")
            self.mirror = FolderMirror(folder, remote, cfg.storage, before_push=lambda: self.log.tb.flush())
            self.mirror.restore()
        else:
            folder = storage.resolve(remote)[1]
        self.log = RunLog(folder, tracker)
        if self.mirror:
            self.mirror.start()

    def sync(self) -> None:
        if self.mirror:
            self.mirror.sync()

    def close(self) -> None:
        self.log.close()
        if self.mirror:
            self.mirror.close()
            # everything is in storage now; the local copy would stay in the node's /tmp for good
            shutil.rmtree(self.mirror.folder, ignore_errors=True)
