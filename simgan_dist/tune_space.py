"""The sweep's parameter space and each trial's config: what `tune`, its results table and the benches share.

A trial's parameters are K_g, lr and λ (PARAMS); everything else comes from the sweep's base
config. Each trial trains under its own run name in the sweep folder, so it has its own history
actors and checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from simgan_dist.config import Config, config_from_dict

PARAMS = ("k_g", "lr", "lambda_reg")


def search_space(cfg: Config) -> dict[str, Any]:
    """tune.k_g / tune.lr / tune.lambda_reg → Tune domains: a list is a choice (every value, with
    `tune.search: grid`), {min, max} log-uniform."""
    from ray import tune

    space = {}
    for key in PARAMS:
        value = getattr(cfg.tune, key)
        if isinstance(value, list):
            space[key] = tune.grid_search(value) if cfg.tune.search == "grid" else tune.choice(value)
        elif key == "k_g":
            space[key] = tune.lograndint(int(value["min"]), int(value["max"]) + 1)  # upper bound exclusive
        else:
            space[key] = tune.loguniform(value["min"], value["max"])
    return space


def trial_count(cfg: Config) -> int:
    """How many trials the sweep runs: num_samples, times every combination of the lists with `search: grid`."""
    if cfg.tune.search != "grid":
        return cfg.tune.num_samples
    return cfg.tune.num_samples * math.prod(len(v) for v in (getattr(cfg.tune, k) for k in PARAMS)
                                            if isinstance(v, list))


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of `cfg` (secrets redacted) with a trial's K_g, lr and λ; D's learning rate keeps its ratio to R's."""
    out = config_from_dict(cfg.to_dict())
    out.train.k_g = int(params["k_g"])
    lr_disc = getattr(out.train, "lr_disc", None)
    if lr_disc:
        out.train.lr_disc = lr_disc * float(params["lr"]) / out.train.lr
    out.train.lr = float(params["lr"])
    out.loss.lambda_reg = float(params["lambda_reg"])
    return out


def sweep_folder(cfg: Config) -> str:
    from simgan_dist.data import storage

    return storage.join(cfg.tune.output, cfg.tune.name)


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_id: str) -> Config:
    """The training config of one trial: its own run name (hence its own history actors) in the sweep."""
    from simgan_dist.data import storage

    cfg = apply_params(config_from_dict(base), params)
    cfg.train.name = f"{cfg.tune.name}-{trial_id}"
    cfg.train.storage_path = storage.join(sweep_folder(cfg), "runs")
    return cfg

def total_steps(cfg: Config) -> int:
    return cfg.train.pretrain_refiner_steps + cfg.train.pretrain_disc_steps + cfg.train.iterations


def redacted(cfg: Config) -> Config:
    """A copy without the storage secrets (SECRET_KEYS): what may be written or handed to Tune."""
    return config_from_dict(cfg.to_dict())
