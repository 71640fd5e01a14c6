"""The checkpoint folder every trainer writes and every consumer (refine, evaluate) reads.

    config.yaml        the resolved Config of the run
    refiner.pt         fp32 state_dict of the bare Refiner (all `refine` needs)
    discriminator.pt   fp32 state_dict of the bare Discriminator
    state.pt           optimizers, schedule counters, RNG states, history buffer
    mlflow_run.json    the run's MLflow run, when tracked: a resumed run goes on logging to it (tracking.py)

Folders may be local or on object storage (`s3://…`); they are read with the same
storage layer as the datasets.

Checkpoints are data, not code: every file holds only tensors and plain containers
(dicts, lists, tuples, numbers, strings) — RNG states included — and is read with
`load_data`, i.e. `torch.load(weights_only=True)`. A file carrying any other pickled
object (which could run code on every worker that loads it) is refused with a
`CheckpointError`, before anything in it is used. `config.yaml` never holds storage
credentials (`Config.to_yaml` redacts them).
"""

from __future__ import annotations

import io
import pickle
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml
from torch import nn

from simgan_dist.config import Config, StorageConfig, config_from_dict
from simgan_dist.core.imaging import to_host
from simgan_dist.core.models import Refiner, build_refiner
from simgan_dist.errors import ConfigError, UserError

CONFIG_FILE = "config.yaml"
REFINER_FILE = "refiner.pt"
DISCRIMINATOR_FILE = "discriminator.pt"
STATE_FILE = "state.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that is missing, incomplete or not from this project."""


def _fp32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
            for k, v in module.state_dict().items()}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_checkpoint(folder: str | Path, cfg: Config, refiner: nn.Module, disc: nn.Module,
                     state: dict[str, Any] | None = None) -> Path:
    """Write a local checkpoint folder; `config.yaml` goes last and marks it complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(_fp32_state(refiner), folder / REFINER_FILE)
    _atomic_torch_save(_fp32_state(disc), folder / DISCRIMINATOR_FILE)
    if state is not None:
        _atomic_torch_save(state, folder / STATE_FILE)
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(cfg.to_yaml())
    tmp.replace(folder / CONFIG_FILE)
    return folder


def _read_bytes(uri: str, name: str, storage: StorageConfig | None) -> bytes:
    from pyarrow import fs as pafs

    from simgan_dist.data import storage as store

    path_uri = store.join(uri, name)
    filesystem, path = store.resolve(path_uri, storage)
    if store.file_info(filesystem, path, path_uri).type == pafs.FileType.NotFound:
        raise CheckpointError(
            f"{uri} is not a complete simgan_dist checkpoint: {name} is missing "
            f"(expected {CONFIG_FILE}, {REFINER_FILE}, {DISCRIMINATOR_FILE})"
        )
    return store.read_bytes(path_uri, storage)


def load_data(source: str | Path | bytes | IO[bytes], what: str, map_location: Any = "cpu",
              allowed: Iterable[type] = ()) -> Any:
    """`torch.load` that accepts only tensors and plain containers (plus the `allowed` data classes).

    Anything else in the pickle — a class, a function, a `__reduce__` payload — is refused
    with a CheckpointError naming `what`, and nothing from the file is executed.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+\.\w+)", str(exc))
        reason = f"it references {found[1]}" if found else str(exc)
        raise CheckpointError(
            f"{what}: refusing to load: it holds pickled Python objects, not only tensors and plain "
            f"containers ({reason}). A checkpoint is data; one that carries code may have been tampered "
            "with, or was written by an older simgan_dist (start that run afresh)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # ValueError: a truncated zip
        raise CheckpointError(f"{what}: not a readable checkpoint file ({type(exc).__name__}: {exc})") from exc


def check_finite(state: dict[str, Any], what: str) -> None:
    """Weights that went NaN or infinite are refused: refined with them, every image comes out flat."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensor(s) hold NaN or infinity (e.g. {bad[0]!r}); the run "
                              "diverged before this checkpoint: use an earlier one")


def load_checkpoint_config(uri: str, storage: StorageConfig | None = None) -> Config:
    text = _read_bytes(uri, CONFIG_FILE, storage).decode()
    try:
        values = yaml.safe_load(text)
        if isinstance(values, dict) and isinstance(values.get("model"), dict):
            # Written before the key existed: those refiners were trained (and must run) with zero padding.
            values["model"].setdefault("refiner_padding", "zeros")
        return config_from_dict(values, drop_retired=True)
    except (ConfigError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{uri}/{CONFIG_FILE} is not a valid simgan_dist config: {exc}") from exc


# What a resumed run may change freely: where it runs and how often it reports, checkpoints,
# evaluates or saves images, its length, and the settings of the other stages. Anything else
# (data.*, model.*, loss.*, the optimizer and schedule) changes what the checkpoint continues.
RESUME_FREE_KEYS = (
    "train.name", "train.storage_path", "train.num_workers", "train.use_gpu", "train.iterations",
    "train.report_every", "train.checkpoint_every", "train.checkpoint_every_s", "train.image_every",
    "train.eval_every", "train.eval_samples", "train.keep_best", "train.max_failures", "train.resource_wait_s",
    "train.compile", "train.channels_last", "train.allow_config_change", "train.deterministic",
)
RESUME_FREE_SECTIONS = ("storage", "refine", "evaluate", "tune", "tracking")
CONFIG_CHANGES_FILE = "config_changes.jsonl"


def _flat(cfg: Config) -> dict[str, Any]:
    from simgan_dist.data import storage

    flat = {}
    for section, values in cfg.to_dict().items():
        if section in RESUME_FREE_SECTIONS:
            continue
        for key, value in values.items():
            if f"{section}.{key}" in RESUME_FREE_KEYS:
                continue
            if section == "data" and isinstance(value, str) and value and not storage.is_s3(value):
                value = storage.resolve(value)[1]  # the same folder, however it is spelled
            flat[f"{section}.{key}"] = value
    return flat


def config_changes(saved: Config, cfg: Config) -> list[str]:
    """'key: old there, new now' for every key outside RESUME_FREE_* that differs."""
    old, new = _flat(saved), _flat(cfg)
    return [f"{key}: {old[key]!r} there, {new[key]!r} now" for key in old if old[key] != new[key]]


def check_config_changes(saved: Config, cfg: Config, run_uri: str, checkpoint_uri: str) -> None:
    """Refuse resuming under a changed config, or with `train.allow_config_change` record the change
    in the run folder (CONFIG_CHANGES_FILE, one JSON line per resume that changed something)."""
    import datetime
    import json

    from simgan_dist.data import storage

    changes = config_changes(saved, cfg)
    if not changes:
        return
    if not cfg.train.allow_config_change:
        raise UserError(f"{checkpoint_uri} was trained with another config ({'; '.join(changes)}): resuming "
                        "would continue it under settings it was not trained with. Choose another train.name, "
                        "or --set train.allow_config_change=true to go on (recorded in the run folder)")
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "resumed_from": checkpoint_uri, "changes": changes}
    path = storage.join(run_uri, CONFIG_CHANGES_FILE)
    try:
        before = storage.read_bytes(path, cfg.storage)
    except storage.MissingFileError:
        before = b""
    storage.write_bytes_atomic(path, before + (json.dumps(record) + "\n").encode(), cfg.storage)


def load_refiner(uri: str, storage: StorageConfig | None = None,
                 device: str | torch.device = "cpu") -> tuple[Refiner, Config]:
    """Rebuild the trained refiner (eval mode) and the config it was trained with."""
    cfg = load_checkpoint_config(uri, storage)
    refiner = build_refiner(cfg.model)
    state = load_data(_read_bytes(uri, REFINER_FILE, storage), f"{uri}/{REFINER_FILE}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{uri}/{REFINER_FILE}: not a state_dict (a {type(state).__name__})")
    check_finite(state, f"{uri}/{REFINER_FILE}")
    try:
        refiner.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{uri}/{REFINER_FILE} does not match the model in its config: {exc}") from exc
    return refiner.to(device).eval(), cfg


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and numbers: loadable with weights_only."""
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_device"] = torch.cuda.current_device()  # the rank's own device: the generator it draws from
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["name"], to_host(npy["keys"]).astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        set_cuda_rng_states(list(state["cuda"]), state.get("cuda_device"))


def set_cuda_rng_states(states: list, saved_device: int | None) -> None:
    """The saved CUDA generator states on the devices this process sees, however many there are.

    A run may resume on a node with fewer (or more) visible GPUs than the one that saved it
    (`torch.cuda.set_rng_state_all` then raises IndexError): each device present gets the state
    saved for its index, if any, and the current device, the one this rank draws from, gets the
    state of the device the rank drew from when it saved (`saved_device`)."""
    count = torch.cuda.device_count()
    for index, saved in enumerate(states[:count]):
        torch.cuda.set_rng_state(saved, index)
    if saved_device is not None and 0 <= saved_device < len(states) and count:
        torch.cuda.set_rng_state(states[saved_device], torch.cuda.current_device())
