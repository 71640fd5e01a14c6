"""Estimators trained on labeled images: the downstream checks and the objective's realism space.

A `Task` says what an estimator learns: `GAZE` (eyes: a 3-D gaze vector, error in degrees) or
`HAND_POSE` (depth maps: the 16 joints' image positions, error in pixels). `evaluate` trains one
per training set (synthetic, refined, real) and tests it on real_test; `realism.GazeFeatures`
trains a gaze one on the synthetic labels and reads its penultimate layer. One training loop
serves all. Pure PyTorch, no Ray.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from simgan_dist.config import EvaluateConfig
from simgan_dist.core.imaging import to_host, to_model_input
from simgan_dist.core.models import GAZE_MODELS, SmallPoseNet

PREDICT_CHUNK = 1024
# fit_estimator holds the training images about twice on its device (the whole set, then the training
# split gathered from it, the validation split inside it), plus the model, its optimizer and a
# batch's activations: kept under this share of the free memory, or the images stay on the host.
RESIDENT_COPIES = 2
DEVICE_MEMORY_SHARE = 0.8


def angular_error_deg(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> np.ndarray:
    """Angle in degrees between each pair of 3-D gaze vectors (neither needs unit length)."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.shape[-1] != 3:
        raise ValueError(f"expected two N×3 arrays of gaze vectors, got {pred.shape} and {target.shape}")
    pred = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    target = target / np.maximum(np.linalg.norm(target, axis=-1, keepdims=True), 1e-12)
    # Rounding can push |cos| a hair above 1, where arccos is NaN.
    cos = np.clip((pred * target).sum(-1), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def joint_distances_px(pred: np.ndarray, joints_uvd: np.ndarray) -> np.ndarray:
    """N×J image distances (pixels) between predicted (u, v) N×J×2 and labeled joints N×J×(2 or 3)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1, 2)
    return np.linalg.norm(pred - np.asarray(joints_uvd, dtype=np.float64)[..., :2], axis=-1)


@dataclass(frozen=True)
class Task:
    """What a downstream estimator learns from labeled images.

    `targets(labels, (h, w))` are the regression targets (N×K floats, L2 loss), `predictions(outputs,
    (h, w))` turns the network's outputs back into label units, `errors(predictions, labels)` is one
    error per image (its mean picks the epoch on the held-out part and is the test figure).
    """

    name: str
    label: str
    unit: str
    outputs: int
    targets: Callable[[np.ndarray, tuple[int, int]], np.ndarray]
    predictions: Callable[[np.ndarray, tuple[int, int]], np.ndarray]
    errors: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def build(self, model: str, channels: int, height: int, width: int) -> torch.nn.Module:
        if self.label == "gaze":
            return GAZE_MODELS[model](channels, height, width)
        return SmallPoseNet(channels, height, width, self.outputs)


def _as_float32(labels: np.ndarray, _shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(labels, dtype=np.float32)


def _uv_targets(joints_uvd: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(u, v) of each joint scaled to [-1, 1] over the image, flattened: N×2J (depth is not learned)."""
    h, w = shape
    uv = np.asarray(joints_uvd, dtype=np.float32)[..., :2] / np.array([w, h], np.float32) * 2 - 1
    return uv.reshape(len(uv), -1)


def _uv_predictions(outputs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return (np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1, 2) + 1) / 2 * np.array([w, h])


GAZE = Task("gaze", "gaze", "°", 3, _as_float32, lambda out, _shape: out, angular_error_deg)
HAND_POSE = Task("hand pose", "joints_uvd", "px", 32, _uv_targets, _uv_predictions,
                 lambda pred, joints: joint_distances_px(pred, joints).mean(1))
TASKS = {"eye": GAZE, "hand": HAND_POSE}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices: a seeded `fraction` of a training set held out for early stopping.

    It depends only on n and the seed, so variants of the same rows (synthetic and refined,
    aligned by id) hold out the same ids: the paired comparison stays paired.
    """
    order = np.random.default_rng([seed, 0x5A1]).permutation(n)
    n_val = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _autocast(on_gpu: bool):
    return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext


def data_device(image_bytes: int, where: torch.device, copies: int = RESIDENT_COPIES,
                free_bytes: int | None = None) -> torch.device:
    """Where images are kept while a model on `where` uses them: there (a GPU) when `copies` of
    them fit in DEVICE_MEMORY_SHARE of its free memory, else on the host, each batch copied over.
    A GPU task shares its device with whatever else runs there: the free memory is read, not assumed."""
    if where.type != "cuda":
        return where
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(where)[0]
    return where if copies * image_bytes <= DEVICE_MEMORY_SHARE * free_bytes else torch.device("cpu")


def _on(images: np.ndarray | torch.Tensor, where: torch.device) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.to(where)
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; they are only ever indexed here.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(images).to(where)


@torch.no_grad()
def run_model(model: torch.nn.Module, images: np.ndarray | torch.Tensor, *, embed: bool = False) -> np.ndarray:
    """Gaze vectors (N×3), or with `embed` the penultimate activations, of N×H×W×C integer images."""
    where = next(model.parameters()).device
    on_gpu = where.type == "cuda"
    images = _on(images, data_device(images.nbytes, where, copies=1))
    forward = model.embed if embed else model
    model.eval()
    with _autocast(on_gpu)():
        return to_host(torch.cat([
            forward(to_model_input(images[lo:lo + PREDICT_CHUNK], device=where, channels_last=on_gpu)).float()
            for lo in range(0, len(images), PREDICT_CHUNK)]))


def predict(model: torch.nn.Module, images: np.ndarray | torch.Tensor, task: Task) -> np.ndarray:
    """The task's predictions in label units (gaze vectors, joint pixels) for N×H×W×C integer images."""
    return task.predictions(run_model(model, images), tuple(images.shape[1:3]))


def fit_estimator(train_images: np.ndarray, train_labels: np.ndarray, cfg: EvaluateConfig, *,
                  task: Task = GAZE, name: str = "gaze", seed: int = 0, threads: int | None = None,
                  progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train an estimator for `task` to convergence on labeled images; returns it and how training went.

    Gaze: `cfg.gaze_model` (the paper's GazeNet, or a small CPU CNN) on the 3-D gaze vector; hand
    pose: `models.SmallPoseNet` on the joints' image positions. L2 on the task's targets, Adam,
    cosine-decayed lr over at most `cfg.gaze_epochs` epochs. A seeded `cfg.gaze_val_fraction` of
    the training set is held out: after every epoch the task's mean error on it is measured,
    training stops after `cfg.gaze_patience` epochs without improvement, and the best epoch's
    weights are kept (no held-out part: all epochs).

    Runs on the GPU when there is one (bf16 autocast, channels-last, the whole integer dataset
    resident on the device when it fits beside what is already there: `data_device`); cuDNN's
    autotuner (`cudnn.benchmark`) is on while it trains (not under deterministic algorithms) and set
    back as it was after.
    """
    benchmark = torch.backends.cudnn.benchmark
    try:
        return _fit(train_images, train_labels, cfg, task, name=name, seed=seed, threads=threads, progress=progress)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _fit(train_images: np.ndarray, train_labels: np.ndarray, cfg: EvaluateConfig, task: Task, *,
         name: str, seed: int, threads: int | None, progress: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    where = device()
    on_gpu = where.type == "cuda"
    # Fixed input shapes: let cuDNN pick its fastest kernels, unless the run asked for the same bits every time.
    torch.backends.cudnn.benchmark = on_gpu and not torch.are_deterministic_algorithms_enabled()
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    autocast = _autocast(on_gpu)
    h, w, c = train_images.shape[1:]
    train_idx, val_idx = validation_split(len(train_images), cfg.gaze_val_fraction, seed)
    held = data_device(train_images.nbytes, where)
    all_images = _on(train_images, held)
    all_targets = torch.from_numpy(task.targets(train_labels, (h, w))).to(where)
    train_rows, val_rows = (torch.from_numpy(i).to(held) for i in (train_idx, val_idx))
    images, targets = all_images[train_rows], all_targets[train_rows.to(where)]
    val_images, val_labels = all_images[val_rows], np.asarray(train_labels)[val_idx]
    to_input = functools.partial(to_model_input, device=where, channels_last=on_gpu)

    model = task.build(cfg.gaze_model, c, h, w).to(where, memory_format=memory_format)
    batch = min(cfg.gaze_batch_size, len(images))
    steps_per_epoch = len(images) // batch
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.gaze_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.gaze_epochs * steps_per_epoch))
    order_rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    val_errors: list[float] = []
    best_epoch, best_state = 0, None
    start = time.perf_counter()
    for epoch in range(cfg.gaze_epochs):
        model.train()
        order = torch.randperm(len(images), generator=order_rng).to(held)
        total = torch.zeros((), device=where)
        t_epoch = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            with autocast():
                pred = model(to_input(images[idx]))
            loss = (pred.float() - targets[idx.to(where)]).square().sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach()
        losses.append(float(to_host(total)) / steps_per_epoch)  # the epoch's one device→host copy
        if len(val_idx):
            val_errors.append(float(task.errors(predict(model, val_images, task), val_labels).mean()))
            if val_errors[-1] <= min(val_errors):
                best_epoch = epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best_epoch = epoch + 1
        if progress:
            rate = steps_per_epoch * batch / (time.perf_counter() - t_epoch)
            val = f" val={val_errors[-1]:.2f}{task.unit}" if val_errors else ""
            print(f"[{task.name} {name} seed {seed}] epoch {epoch + 1}/{cfg.gaze_epochs} loss={losses[-1]:.4f}{val} "
                  f"({rate:,.0f} img/s)", flush=True)
        if val_errors and cfg.gaze_patience and epoch + 1 - best_epoch >= cfg.gaze_patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), {
        "model": cfg.gaze_model if task.label == GAZE.label else "small-pose", "seed": seed,
        "train_rows": int(len(images)), "val_rows": int(len(val_idx)), "epochs_run": len(losses),
        "best_epoch": best_epoch, "seconds": round(time.perf_counter() - start, 1), "device": str(where),
        "loss_curve": losses, "val_curve": val_errors,
    }
