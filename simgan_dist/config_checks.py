"""The rules a resolved config must follow; each broken rule is a ConfigError naming its key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simgan_dist.errors import ConfigError

if TYPE_CHECKING:
    from simgan_dist.config import Config

SEARCH_KEYS = ("k_g", "lr", "lambda_reg")  # the tune search space's dimensions


def validate(cfg: Config) -> None:
    """Checks only: raises ConfigError naming the first bad key, changes nothing."""
    choices = {
        "model.architecture": (cfg.model.architecture, ("eye", "hand")),
        "model.disc_stack": (cfg.model.disc_stack, ("", "eye", "hand")),
        "model.refiner_padding": (cfg.model.refiner_padding, ("reflect", "replicate", "zeros")),
        "loss.psi": (cfg.loss.psi, ("identity", "channel_mean", "downsample")),
        "loss.adv_reduction": (cfg.loss.adv_reduction, ("mean", "sum")),
        "loss.reg_reduction": (cfg.loss.reg_reduction, ("mean", "sum")),
        "evaluate.gaze_model": (cfg.evaluate.gaze_model, ("gazenet", "small")),
        "train.precision": (cfg.train.precision, ("auto", "fp32", "bf16")),
        "train.zero_stage": (cfg.train.zero_stage, (0, 1, 2)),
        "train.optimizer": (cfg.train.optimizer, ("adam", "sgd")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "train.k_g": cfg.train.k_g,
        "train.k_d": cfg.train.k_d,
        "train.num_workers": cfg.train.num_workers,
        "train.buffer_size": cfg.train.buffer_size,
        "train.buffer_shards": cfg.train.buffer_shards,
        "train.report_every": cfg.train.report_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.image_every": cfg.train.image_every,
        "train.eval_samples": cfg.train.eval_samples,
        "train.keep_best": cfg.train.keep_best,
        "tune.num_samples": cfg.tune.num_samples,
        "tune.grace_steps": cfg.tune.grace_steps,
        "refine.min_actors": cfg.refine.min_actors,
        "refine.max_actors": cfg.refine.max_actors,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.train.eval_every < 0:
        raise ConfigError(f"train.eval_every: must be >= 0 (0 = off), got {cfg.train.eval_every}")
    for key in ("iterations", "pretrain_refiner_steps", "pretrain_disc_steps", "max_failures"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(cfg.train, key)}")
    # Written as ranges so that NaN, which every optimizer would take silently, fails too.
    if not 0 < cfg.train.lr < float("inf"):
        raise ConfigError(f"train.lr: must be a positive number, got {cfg.train.lr}")
    if not 0 <= cfg.train.lr_disc < float("inf"):
        raise ConfigError(f"train.lr_disc: must be >= 0 (0 = train.lr), got {cfg.train.lr_disc}")
    if not 0 <= cfg.loss.lambda_reg < float("inf"):
        raise ConfigError(f"loss.lambda_reg: must be >= 0, got {cfg.loss.lambda_reg}")
    for key, name, parent in (("train.name", cfg.train.name, "train.storage_path"),
                              ("tune.name", cfg.tune.name, "tune.output")):
        # A run is written to <parent>/<name>: one plain folder name keeps it inside.
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"{key}: {name!r} must be a plain folder name (no '/', '..' or absolute path): "
                              f"runs are confined to {parent}")
    if not 0.0 <= cfg.data.real_val_fraction < 1.0:
        raise ConfigError(f"data.real_val_fraction: must be in [0, 1), got {cfg.data.real_val_fraction}")
    if cfg.train.eval_every and not cfg.data.real_val and cfg.data.real_val_fraction == 0:
        raise ConfigError("train.eval_every > 0 needs held-out real images: set data.real_val or "
                          "data.real_val_fraction > 0 (or train.eval_every=0)")
    if cfg.tune.search not in ("random", "grid", "optuna"):
        raise ConfigError(f"tune.search: {cfg.tune.search!r} is not one of ('random', 'grid', 'optuna')")
    if cfg.tune.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor: must be >= 2, got {cfg.tune.reduction_factor}")
    if cfg.tune.max_concurrent_trials < 0:
        raise ConfigError(f"tune.max_concurrent_trials: must be >= 0 (0 = what the cluster fits), "
                          f"got {cfg.tune.max_concurrent_trials}")
    for key in SEARCH_KEYS:
        check_search_dimension(f"tune.{key}", getattr(cfg.tune, key), integer=key == "k_g")
    if not cfg.evaluate.seeds or len(set(cfg.evaluate.seeds)) != len(cfg.evaluate.seeds):
        raise ConfigError(f"evaluate.seeds: give one or more distinct seeds, got {cfg.evaluate.seeds}")
    if cfg.evaluate.max_train_rows < 0:
        raise ConfigError(f"evaluate.max_train_rows: must be >= 0 (0: every row), got {cfg.evaluate.max_train_rows}")
    if not 0 <= cfg.evaluate.gaze_val_fraction < 1:
        raise ConfigError(f"evaluate.gaze_val_fraction: must be in [0, 1), got {cfg.evaluate.gaze_val_fraction}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0 = off), got {cfg.train.ema_decay}")
    if cfg.train.disc_noise < 0:
        raise ConfigError(f"train.disc_noise: must be >= 0, got {cfg.train.disc_noise}")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {cfg.train.betas}")
    for key in ("refine.batch_size", "refine.rows_per_shard", "refine.num_gpus", "train.checkpoint_every_s"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key}: must be >= 0 (0 = automatic/off), got {getattr(getattr(cfg, section), name)}")
    if cfg.refine.max_actors < cfg.refine.min_actors:
        raise ConfigError(f"refine.max_actors ({cfg.refine.max_actors}) is below refine.min_actors "
                          f"({cfg.refine.min_actors})")
    check_tracking_uri(cfg.tracking.mlflow_uri)
    if cfg.train.batch_size % 2:
        raise ConfigError(f"train.batch_size: must be even (half real, half history), got {cfg.train.batch_size}")
    if cfg.train.buffer_size < cfg.train.batch_size // 2:
        raise ConfigError("train.buffer_size: must hold at least half a batch")


# MLflow's stores and servers (a bare path would be its file store, which MLflow 3 refuses by default).
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "file")


def check_tracking_uri(uri: str) -> None:
    """An MLflow tracking URI of a known kind, without a password: the URI is logged and written
    (config.yaml, the run's params), so credentials go through MLflow's environment variables."""
    from urllib.parse import urlsplit

    if not uri:
        return
    parts = urlsplit(uri)
    if parts.scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking.mlflow_uri: {uri!r} is not an MLflow tracking URI: give one of "
                          f"{', '.join(s + ':' for s in TRACKING_SCHEMES)} (e.g. http://host:5000, sqlite:////abs/mlflow.db)")
    if parts.password:
        raise ConfigError("tracking.mlflow_uri: holds a password, which would be written with the config: give "
                          "credentials through MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or "
                          "MLFLOW_TRACKING_TOKEN) instead")


def check_search_dimension(key: str, value: Any, integer: bool = False) -> None:
    """A search dimension is a non-empty list of positive numbers, or a log-uniform {min: A, max: B}."""
    kind = "integers" if integer else "numbers"

    def ok(v: Any) -> bool:
        allowed = (int,) if integer else (int, float)
        return isinstance(v, allowed) and not isinstance(v, bool) and v > 0

    if isinstance(value, list):
        if not value or not all(ok(v) for v in value):
            raise ConfigError(f"{key}: a choice list needs positive {kind}, got {value!r}")
        return
    if isinstance(value, dict):
        if set(value) != {"min", "max"} or not all(ok(v) for v in value.values()) or value["min"] > value["max"]:
            raise ConfigError(f"{key}: a log-uniform range is {{min: A, max: B}} with 0 < A <= B ({kind}), "
                              f"got {value!r}")
        return
    raise ConfigError(f"{key}: expected a list of choices or a {{min: A, max: B}} log-uniform range, got {value!r}")
