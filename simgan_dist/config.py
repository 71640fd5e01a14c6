"""One typed config tree for every stage of the pipeline.

A config starts from a preset (`eye`, `hand`, `hand-tiny`, `tiny`), is overlaid with a YAML file
and then with `--set section.key=value` overrides. Unknown keys and wrong types are
errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simgan_dist.config_checks import SEARCH_KEYS, validate
from simgan_dist.errors import ConfigError


@dataclass
class ModelConfig:
    image_height: int = 35
    image_width: int = 55
    image_channels: int = 1
    # "eye" (8-bit gray) or "hand" (16-bit depth): the images' kind, and which of the paper's
    # discriminator stacks to build unless disc_stack says otherwise.
    architecture: str = "eye"
    # "eye" or "hand": D's layer stack; empty takes the architecture's. The hand stack strides 32x
    # and needs ~160 px; small depth crops (the hand-tiny preset, 64 px) use the eye stack (11x11 patches).
    disc_stack: str = ""
    refiner_channels: int = 64
    refiner_blocks: int = 4
    refiner_kernel: int = 3
    # How R's convolutions see beyond the image edge: "reflect" (mirror the image), "replicate" or
    # "zeros" (the paper's same padding: black beyond the edge, which R learns to paint a frame
    # against; bench/RESULTS.md, issue 23). Checkpoints written before this key used "zeros".
    refiner_padding: str = "reflect"
    # Width multiplier for D's conv widths (1.0 = the paper's 96/64/32/32).
    disc_width: float = 1.0


@dataclass
class LossConfig:
    # Weight of the self-regularisation; its meaning depends on reg_reduction (see below).
    lambda_reg: float = 1e-4
    # "sum": the paper's ‖ψ(R(x)) − ψ(x)‖₁ summed over pixels (λ 1e-4 on a 35x55 eye ≈ 0.19 per-pixel mean);
    # "mean": the per-pixel mean, so λ does not depend on the image size.
    reg_reduction: str = "sum"
    # ψ in λ·‖ψ(R(x)) − ψ(x)‖₁: "identity", "channel_mean" or "downsample".
    psi: str = "identity"
    psi_downsample: int = 4
    # How the per-patch cross entropies are combined: "mean" or "sum".
    adv_reduction: str = "mean"


@dataclass
class DataConfig:
    synthetic: str = ""
    real: str = ""
    real_test: str = ""
    # Held-out unlabeled real images for the label-free objective (never real_test). Empty: the
    # rows of `real` whose id hashes below `real_val_fraction` (training then skips them).
    real_val: str = ""
    real_val_fraction: float = 0.05


@dataclass
class StorageConfig:
    # Empty values fall back to the standard AWS environment variables.
    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str = ""


# Never written (checkpoints, Tune results, reports, logs): serialised as "" (= the AWS_* environment).
SECRET_KEYS = ("storage.access_key_id", "storage.secret_access_key", "storage.session_token")


@dataclass
class TrainConfig:
    name: str = "simgan"
    storage_path: str = "runs"
    num_workers: int = 1
    use_gpu: bool = False
    batch_size: int = 512
    # "adam" or "sgd" (the paper's; betas[0] is then its momentum).
    optimizer: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr: float = 1e-3
    # D's learning rate; 0 means the same as lr.
    lr_disc: float = 0.0
    # > 0: refine with an exponential moving average of R's weights (decay per R step).
    ema_decay: float = 0.0
    # Std of Gaussian instance noise on D's inputs (model units): it hides fine texture and sensor noise,
    # so R need not paint ripples to fake them. It fades linearly to 0 unless disc_noise_fade is false.
    disc_noise: float = 0.0
    disc_noise_fade: bool = True
    k_g: int = 50
    k_d: int = 1
    pretrain_refiner_steps: int = 1000
    pretrain_disc_steps: int = 200
    iterations: int = 2000
    # History images PER WORKER: the shared buffer holds buffer_size × num_workers, so its
    # turnover per D step stays the same whatever the worker count.
    buffer_size: int = 25600
    buffer_shards: int = 4
    zero_stage: int = 0
    seed: int = 0
    report_every: int = 10
    checkpoint_every: int = 100
    # Also checkpoint at the first report this many seconds after the last checkpoint (0: steps only).
    checkpoint_every_s: float = 900.0
    image_every: int = 100
    max_failures: int = 2
    channels_last: bool = True
    # False: read both corpora in stored order (reproducible runs, trajectory tests).
    shuffle: bool = True
    # True: the same machine, seed, data and worker count give bit-identical weights. Ray Data keeps
    # the stored block order (the shuffle is then seeded within each chunk of batches), torch uses
    # deterministic kernels only, and the history shards take the workers' pushes and samples in
    # rank order at every D step. A sweep's rungs then compare each trial with the trials created
    # before it only (train/rungs.py): concurrent trials are stopped as in a sweep of one trial at a
    # time, so a random or grid sweep is reproducible too. Costs: bench/RESULTS.md, issue 23.
    deterministic: bool = False
    # "auto": bf16 autocast on GPU, fp32 on CPU.
    precision: str = "auto"
    # Every eval_every steps rank 0 refines the first eval_samples synthetic images and scores them
    # (objective.py); 0 turns it off. The keep_best checkpoints with the lowest objective are kept
    # besides the latest.
    eval_every: int = 100
    eval_samples: int = 1000
    keep_best: int = 3
    # Seconds an autoscaling cluster gets to add the CPUs/GPUs a run needs; 0: fail at once.
    resource_wait_s: float = 0.0
    # torch.compile R and D (in place: checkpoints keep their keys); worth it on GPU.
    compile: bool = False
    # Resuming a run whose checkpoint was trained on other data, model, loss or optimizer
    # settings is refused (the keys are listed); true goes on and records the change in the
    # checkpoint (config_changes.json). Cadence, logging and worker settings never need it.
    allow_config_change: bool = False


@dataclass
class RefineConfig:
    # Images per forward pass; 0: from the image size, so activations fit in batch_memory_gb.
    batch_size: int = 0
    batch_memory_gb: float = 4.0
    # Rows per shard task; 0: as many as make task_mb of input images (several tasks in flight per actor).
    rows_per_shard: int = 0
    task_mb: float = 32.0
    # GPUs per refiner actor (0: CPU actors, fp32). Explicit, never read from the cluster: an
    # autoscaling cluster with its GPU nodes scaled to zero must scale them up, not fall back to CPUs.
    num_gpus: float = 0.0
    # The actor pool grows from min_actors to max_actors as the cluster (autoscaler) provides resources.
    min_actors: int = 1
    max_actors: int = 1
    compile: bool = False


@dataclass
class EvaluateConfig:
    # "gazenet" (the paper's, the headline) or "small" (a CNN ~30x cheaper, for CPU runs).
    gaze_model: str = "gazenet"
    # At most this many epochs; the epoch kept is the best on the held-out validation part.
    gaze_epochs: int = 20
    gaze_batch_size: int = 256
    gaze_lr: float = 1e-3
    # Share of each estimator's OWN training set held out to choose its epoch (never real_test).
    gaze_val_fraction: float = 0.1
    # Stop after this many epochs without a lower validation error (0: run all epochs).
    gaze_patience: int = 4
    # One estimator per variant and seed; refined vs synthetic is compared seed by seed.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    realism_samples: int = 2000
    # The estimators train on at most this many synthetic/refined pairs (and labeled real rows): the
    # same ids on both sides, those of smallest blake2b(id) hash, and only those rows are read. 20,000
    # keeps a 2-core machine to minutes per estimator; 0 takes every row.
    max_train_rows: int = 20000


@dataclass
class TuneConfig:
    # A sweep's name: rerunning with the same name and output resumes it.
    name: str = "sweep"
    # Where the results table, best config and best checkpoint URI go (a folder or s3://…); trial
    # runs go under it too.
    output: str = "sweeps"
    num_samples: int = 8
    # Search space. A list is a choice; a mapping {min, max} is a log-uniform range (k_g: rounded).
    # The paper's values (K_g 50 for eyes, 2 for hands; lr 1e-3 and 1e-4; λ) lie inside the defaults.
    k_g: Any = field(default_factory=lambda: [2, 10, 50])
    lr: Any = field(default_factory=lambda: [1e-4, 1e-3])
    lambda_reg: Any = field(default_factory=lambda: [1e-5, 1e-4, 1e-3])
    # "random" (Tune's BasicVariantGenerator, seeded by train.seed), "grid" (every combination of
    # the lists, num_samples times; ranges still sampled) or "optuna" (TPE).
    search: str = "random"
    # Successive halving (ASHA's rule, train/rungs.py): rungs at grace_steps × reduction_factor^k
    # steps; at each a trial goes on only if its objective is within the best 1/reduction_factor.
    grace_steps: int = 100
    reduction_factor: int = 2
    # 0: as many as the cluster's CPUs (or GPUs) fit, train.num_workers each.
    max_concurrent_trials: int = 0


@dataclass
class TrackingConfig:
    # MLflow tracking URI every node reaches (http://host:5000, sqlite:////abs/mlflow.db); empty: the
    # MLFLOW_TRACKING_URI environment variable; neither: no tracking (tracking.py).
    mlflow_uri: str = ""
    # MLflow experiment; empty: the run's name family (train.name; a sweep's tune.name, its trials
    # included; refine and evaluate join the experiment of their checkpoint's run).
    experiment: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain dict of the tree; the secrets in SECRET_KEYS become "" unless `redact=False`
        (only for copies that stay in this process)."""
        data = dataclasses.asdict(self)
        if redact:
            for key in SECRET_KEYS:
                section, name = key.split(".")
                data[section][name] = ""
        return data

    def redacted(self) -> list[str]:
        """The secret keys that are set (and that serialising leaves out)."""
        return [key for key in SECRET_KEYS if getattr(getattr(self, key.split(".")[0]), key.split(".")[1])]

    def to_yaml(self) -> str:
        """YAML for files and screens, secrets redacted (a comment says which were set)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if self.redacted():
            text = (f"# {', '.join(self.redacted())}: set, not written (secrets are never written; "
                    "give them through the environment or a config file again)\n" + text)
        return text


# Presets are overlays on the defaults, written in the same form a YAML file uses.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's eye experiment (UnityEyes → MPIIGaze), 35x55 gray.
    "eye": {},
    # The paper's hand experiment (NYU depth), 224x224 depth, 7x7 filters, 10 blocks.
    "hand": {
        "model": {
            "image_height": 224,
            "image_width": 224,
            "architecture": "hand",
            "refiner_kernel": 7,
            "refiner_blocks": 10,
        },
        "train": {"k_g": 2, "pretrain_refiner_steps": 500, "batch_size": 64},
    },
    # The hand experiment sized for 2 CPU cores: 64x64 depth crops (`simulate --kind hand --hand-size 64`),
    # a small refiner, the eye stack as a local D.
    "hand-tiny": {
        "model": {
            "image_height": 64,
            "image_width": 64,
            "architecture": "hand",
            "disc_stack": "eye",
            "refiner_channels": 16,
            "refiner_blocks": 2,
            "disc_width": 0.5,
        },
        "train": {"k_g": 2, "batch_size": 32, "pretrain_refiner_steps": 200, "pretrain_disc_steps": 50,
                  "buffer_size": 2048, "buffer_shards": 2, "eval_samples": 256, "deterministic": True},
        "refine": {"batch_size": 256, "rows_per_shard": 2000},
        # batch 32: a few thousand maps give the joint regressor enough updates in 15 epochs
        "evaluate": {"gaze_model": "small", "gaze_epochs": 15, "gaze_batch_size": 32, "realism_samples": 500},
    },
    # A few channels and one block: CPU tests and the demo.
    "tiny": {
        "model": {"refiner_channels": 8, "refiner_blocks": 1, "disc_width": 0.25},
        "train": {
            "batch_size": 32,
            "k_g": 2,
            "pretrain_refiner_steps": 20,
            "pretrain_disc_steps": 10,
            "iterations": 40,
            "buffer_size": 256,
            "buffer_shards": 2,
            "report_every": 10,
            "checkpoint_every": 20,
            "image_every": 20,
            "eval_every": 0,
            "eval_samples": 200,
            "deterministic": True,
        },
        "refine": {"batch_size": 256, "rows_per_shard": 2000},
        "evaluate": {"gaze_model": "small", "gaze_epochs": 3, "gaze_batch_size": 128, "realism_samples": 500},
        "tune": {"num_samples": 2, "k_g": [1, 2], "lr": [1e-3], "lambda_reg": [1e-4]},
    },
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; ints are accepted where floats are."""
    if annotation is Any:  # checked by validate (the tune search space: a list or a range)
        return value
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got bool {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


# Keys older releases wrote (checkpoints keep their config): what replaced them.
RETIRED_KEYS = {"refine.num_actors": "refine.min_actors and refine.max_actors (an autoscaling actor pool)"}


def _apply(section: Any, overlay: dict[str, Any], prefix: str) -> None:
    if not isinstance(overlay, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {overlay!r}")
    hints = typing.get_type_hints(type(section))
    for key, value in overlay.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            if path in RETIRED_KEYS:
                raise ConfigError(f"config key '{path}' was replaced by {RETIRED_KEYS[path]}")
            known = ", ".join(hints)
            raise ConfigError(f"unknown config key '{path}' (known here: {known})")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, path)
        else:
            setattr(section, key, _coerce(value, hints[key], path))


def _normalize(cfg: Config) -> None:
    """Parsing, before validation: YAML's `1e-4` strings in the search dimensions become numbers."""
    for key in SEARCH_KEYS:
        value = getattr(cfg.tune, key)
        if isinstance(value, list):
            setattr(cfg.tune, key, [_number(v) for v in value])
        elif isinstance(value, dict):
            setattr(cfg.tune, key, {k: _number(v) for k, v in value.items()})


def _number(value: Any) -> Any:
    """YAML reads `1e-4` (no dot) as a string; take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` → (["train", "lr"], 0.0001); values parse as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: key must look like section.key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not a valid YAML scalar or list ({exc})") from None
    # YAML reads "1e-4" as a string; numbers written that way are common in overrides.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def load_config(
    preset: str = "eye",
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Preset, then YAML file, then `--set` overrides, each checked key by key."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    cfg = Config()
    _apply(cfg, copy.deepcopy(PRESETS[preset]), "")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        file_preset = loaded.pop("preset", None) if isinstance(loaded, dict) else None
        if file_preset is not None:
            if not isinstance(file_preset, str) or file_preset not in PRESETS:
                raise ConfigError(f"{path}: unknown preset {file_preset!r}: choose one of {sorted(PRESETS)}")
            cfg = Config()
            _apply(cfg, copy.deepcopy(PRESETS[file_preset]), "")
        try:
            _apply(cfg, loaded, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply(cfg, nested, "")
    _normalize(cfg)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], drop_retired: bool = False) -> Config:
    """Rebuild a Config from `Config.to_dict()` (Ray workers), or from an older release's checkpoint
    with `drop_retired` (its RETIRED_KEYS no longer mean anything)."""
    data = copy.deepcopy(data)
    if drop_retired:
        for path in RETIRED_KEYS:
            *sections, key = path.split(".")
            parent = data
            for name in sections:
                parent = parent.get(name) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(key, None)
    cfg = Config()
    _apply(cfg, data, "")
    _normalize(cfg)
    validate(cfg)
    return cfg
