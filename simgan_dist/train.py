"""`simgan-dist train`: the single-process trainer (--local) or the Ray Train + DeepSpeed job."""

from __future__ import annotations

import argparse
from pathlib import Path

from simgan_dist.config import load_config


def cli_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    if args.local:
        from simgan_dist.local_train import train_local

        if "://" in cfg.train.storage_path:
            raise SystemExit("train --local writes to a local folder: set train.storage_path to a path")
        run = train_local(cfg, Path(cfg.train.storage_path) / cfg.train.name)
        print(f"checkpoint: {run.checkpoint}")
        print(f"images and TensorBoard logs: {run.folder}")
        return 0
    raise SystemExit("distributed training is not wired yet: use --local")
