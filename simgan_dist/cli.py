"""`simgan-dist`: one command line for the pipeline data → train → tune → refine → evaluate.

Each subcommand's handler lives in its stage module and is imported only when that
subcommand runs, so `--help` stays instant (no Ray or DeepSpeed import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from simgan_dist.config import PRESETS, load_config
from simgan_dist.errors import ConfigError, UserError

EPILOG = """\
pipeline:
  simgan-dist simulate --out data --synthetic 20000 --real 5000 --real-test 2000
  simgan-dist train --config jobs/configs/tiny.yaml \\
      --set data.synthetic=data/synthetic --set data.real=data/real --set train.storage_path=runs
  simgan-dist tune --config jobs/configs/tune-tiny.yaml      # optional: sweep K_g, lr, λ
  simgan-dist refine --preset tiny --checkpoint CHECKPOINT --input data/synthetic --out data/refined
  simgan-dist evaluate --preset tiny --synthetic data/synthetic --refined data/refined \\
      --real-test data/real_test --run runs/tiny-simgan --out report
(train prints the CHECKPOINT path; `make demo` runs exactly this on a small corpus.)

Every command takes --preset/--config/--set; `simgan-dist config show` prints the result.
Ray: commands join RAY_ADDRESS or the cluster `ray start` registered on this machine, else start
a local instance; --verbose shows Ray's own logs in the console (they are always in its log folder).
Object storage: s3://bucket/prefix URIs use AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (or storage.* in the config).
Experiment tracking: --set tracking.mlflow_uri=http://host:5000 (or MLFLOW_TRACKING_URI) logs train,
tune, refine and evaluate to MLflow; tracking.experiment names the experiment (README).
"""


class _FormatNames:
    """`ingest`'s format choices, read from the formats' registry only when argparse looks at them:
    building the parser (and `simgan-dist --help`) imports no format module."""

    def _names(self) -> list[str]:
        from simgan_dist.data.formats import FORMATS

        return sorted(FORMATS)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _add_config_args(parser: argparse.ArgumentParser, default_preset: str = "eye") -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="show Ray's (and MLflow's) own console output too (worker logs, INFO lines, Ray Data progress); "
        "without it they stay in Ray's log folder",
    )
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--preset", default=default_preset, choices=sorted(PRESETS),
        help=f"starting point for the config (default: {default_preset})",
    )
    group.add_argument("--config", metavar="FILE", help="YAML file overlaid on the preset")
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set train.lr=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simgan-dist",
        description="Distributed SimGAN on Ray: refine labeled synthetic images to look real.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="show the resolved configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)
    show.set_defaults(handler="simgan_dist.cli:show_config")

    simulate = commands.add_parser(
        "simulate", help="render a two-domain synthetic/real dataset into object storage",
        description="Render labeled synthetic eyes, unlabeled real-looking eyes and a labeled "
        "real test set (or hand depth maps with --kind hand), in parallel Ray tasks.",
    )
    simulate.add_argument("--out", required=True, metavar="URI", help="folder or s3://bucket/prefix")
    simulate.add_argument("--synthetic", type=int, default=10000, metavar="N", help="synthetic images")
    simulate.add_argument("--real", type=int, default=2000, metavar="M", help="unlabeled real images")
    simulate.add_argument("--real-test", type=int, default=1000, metavar="K", help="labeled real test images")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--kind", choices=("eye", "hand"), default="eye")
    simulate.add_argument("--hand-size", type=int, default=224, metavar="PX",
                          help="side of hand depth maps in pixels: 224 as NYU's crops, 64 for CPUs (default 224)")
    simulate.add_argument("--rows-per-shard", type=int, default=50000, metavar="R")
    simulate.add_argument("--overwrite", action="store_true",
                          help="replace datasets already at --out (the old ones stay readable until the new "
                          "ones are committed)")
    _add_config_args(simulate)
    simulate.set_defaults(handler="simgan_dist.data.simulate:cli_simulate")

    ingest = commands.add_parser(
        "ingest", help="convert a downloaded dataset into the Parquet contract",
        description="Convert UnityEyes, MPIIGaze, Kaggle HDF5, NYU hand or an image folder. "
        "Files that cannot be parsed go to a quarantine table with the reason.",
    )
    ingest.add_argument("format", choices=_FormatNames(), metavar="FORMAT", help="one of: %(choices)s")
    ingest.add_argument("src", metavar="SRC", help="the downloaded dataset (folder or file)")
    ingest.add_argument("--out", required=True, metavar="URI")
    ingest.add_argument("--labels", metavar="CSV", help="folder format: CSV with an id column and label columns")
    ingest.add_argument("--rows-per-shard", type=int, default=50000, metavar="R")
    ingest.add_argument("--kind", choices=("synthetic", "real", "real_test"),
                        help="the manifest's kind (default per format: unityeyes and labeled kaggle-h5 synthetic, "
                        "others real); for nyu-hand, synthetic reads synthdepth_*.png instead of depth_*.png")
    ingest.add_argument("--workers", type=int, metavar="N", help="reader processes (default: all cores)")
    ingest.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already at --out (the old one stays readable until the new one "
                        "is committed)")
    _add_config_args(ingest)
    ingest.set_defaults(handler="simgan_dist.data.ingest:cli_ingest")

    train = commands.add_parser(
        "train", help="train SimGAN (Ray Train + DeepSpeed, or --local for one process)",
        description="Algorithm 1 of the paper. Without --local: a Ray TorchTrainer with "
        "train.num_workers workers, DeepSpeed engines and a shared history buffer.",
    )
    train.add_argument("--local", action="store_true", help="single process, plain PyTorch, no Ray")
    _add_config_args(train)
    train.set_defaults(handler="simgan_dist.train.driver:cli_train")

    tune = commands.add_parser(
        "tune", help="Ray Tune sweep over K_g, lr and λ, ranked without real labels",
        description="Each trial is a Ray Train run (its own workers and history buffer) scored every "
        "train.eval_every steps by the label-free objective; at each rung (tune.grace_steps × "
        "tune.reduction_factor^k steps) trials whose objective lags stop themselves. Then each completed eye "
        "trial is judged once: a gaze estimator trained on its refined eyes, its scatter on held-out real eyes "
        "(lower = better); completed trials rank by it, the rest by objective. "
        "Rerunning the same tune.name resumes the sweep. "
        "Writes results.csv/.md, best_config.yaml and best_checkpoint.txt under tune.output/tune.name.",
    )
    _add_config_args(tune)
    tune.set_defaults(handler="simgan_dist.tune:cli_tune")

    refine = commands.add_parser(
        "refine", help="refine a whole synthetic corpus into object storage, exactly once",
    )
    refine.add_argument("--checkpoint", required=True, metavar="URI",
                        help="a checkpoint folder, or a training run / sweep folder (its best checkpoint by the "
                        "label-free objective is used)")
    refine.add_argument("--input", required=True, metavar="URI", help="synthetic dataset")
    refine.add_argument("--out", required=True, metavar="URI", help="where the refined dataset goes")
    _add_config_args(refine)
    refine.set_defaults(handler="simgan_dist.refine:cli_refine")

    evaluate = commands.add_parser(
        "evaluate", help="gaze accuracy, label preservation and realism, with an HTML report",
    )
    evaluate.add_argument("--synthetic", required=True, metavar="URI")
    evaluate.add_argument("--refined", required=True, metavar="URI")
    evaluate.add_argument("--real-test", required=True, metavar="URI")
    evaluate.add_argument("--real", metavar="URI", help="real images (labeled ones add a ceiling row)")
    evaluate.add_argument("--run", metavar="DIR", help="training run folder, for loss curves")
    evaluate.add_argument("--out", required=True, metavar="DIR")
    evaluate.add_argument("--no-ray", action="store_true", help="train the gaze models in this process, one by one")
    _add_config_args(evaluate)
    evaluate.set_defaults(handler="simgan_dist.evaluate:cli_evaluate")
    return parser


def show_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from simgan_dist.console import configure_console

    configure_console(getattr(args, "verbose", False))  # before the stage module imports Ray
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"simgan-dist {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"simgan-dist {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
