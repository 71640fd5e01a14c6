"""`simgan-dist train`: the driver of a Ray Train + DeepSpeed run, or --local for one process.

`fit` checks up front what would otherwise fail on every worker (the corpora, a run name reused
with settings its checkpoint cannot continue under), then starts the workers' loop (worker.py).
A restarted worker group, or a resubmitted job with the same `train.name` and
`train.storage_path`, continues from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
from pathlib import Path
from typing import Any

from simgan_dist.config import Config, config_from_dict, load_config
from simgan_dist.core.imaging import wide_codes
from simgan_dist.errors import UserError


class TrainingError(UserError, RuntimeError):
    """A training run that failed once its restarts (train.max_failures) were used up."""


def history_run_id(cfg: Config) -> str:
    """One buffer per run: the run name plus where it is stored."""
    where = hashlib.sha1(cfg.train.storage_path.encode()).hexdigest()[:8]
    return f"{cfg.train.name}-{where}"


def fit(cfg: Config, datasets: dict[str, Any] | None = None, callbacks: list | None = None,
        worker_resources: dict[str, float] | None = None, mlflow_parent: str | None = None,
        rungs: dict[str, Any] | None = None):
    """Train on the connected Ray cluster (or a local one); returns the ray.train.Result.

    `datasets` ({"synthetic", "real"} Ray Datasets with a uint8 N×H×W×C `image` column)
    replaces reading `data.synthetic` / `data.real`. `callbacks`: Ray Train callbacks (Tune's
    report callback in a sweep). `worker_resources`: each worker's share, as planned by a sweep
    for its concurrent trials; by default `resources.training_resources` plans it on the
    connected cluster (and fails at once when the run cannot fit). The run's history-buffer
    actors are removed when it ends, however it ends, and so is the autoscaler request
    `resources.training_resources` made for it (`resources.clear_resource_request`). `mlflow_parent`:
    the MLflow run of the sweep this run is a trial of (tracking.py). `rungs`: a sweep's trial stops at
    its rungs for the verdict of the sweep's rung book (`rungs.RungStop.attach`).
    """
    from simgan_dist.train import resources

    try:
        return _fit(cfg, datasets, callbacks, worker_resources, mlflow_parent, rungs)
    finally:
        resources.clear_resource_request()


def _absolute_local_paths(cfg: Config) -> Config:
    """A copy whose local paths (the run folder, the corpora rank 0's evaluator reads) are absolute:
    Ray Train runs each worker in a folder of its own, where a relative path means another place."""
    from simgan_dist.data import storage
    from simgan_dist.tracking import absolute_uri

    cfg = config_from_dict(cfg.to_dict(redact=False))
    cfg.tracking.mlflow_uri = absolute_uri(cfg.tracking.mlflow_uri)
    for section, key in (("train", "storage_path"), ("data", "synthetic"), ("data", "real"), ("data", "real_val")):
        value = getattr(getattr(cfg, section), key)
        if value and not storage.is_s3(value):
            setattr(getattr(cfg, section), key, storage.resolve(value)[1])
    return cfg


def _fit(cfg: Config, datasets: dict[str, Any] | None = None, callbacks: list | None = None,
         worker_resources: dict[str, float] | None = None, mlflow_parent: str | None = None,
         rungs: dict[str, Any] | None = None):
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from simgan_dist import console, ray_cluster, tracking
    from simgan_dist.data import storage
    from simgan_dist.data.pipeline import share_env
    from simgan_dist.train import distributed_history as dh
    from simgan_dist.train import resources
    from simgan_dist.train.worker import train_loop_per_worker

    ray_cluster.connect()
    ray_cluster.require_shared_storage(
        {"train.storage_path": cfg.train.storage_path,
         **({f"data.{key}": getattr(cfg.data, key) for key in ("synthetic", "real", "real_val")}
            if datasets is None else {})}, "train")
    if worker_resources is None:
        worker_resources = resources.training_resources(cfg)
    context = ray.data.DataContext.get_current()
    # Our progress line says what matters; per-epoch Ray Data bars would bury it.
    context.enable_progress_bars = False
    # Unshuffled and deterministic runs read in stored order, caching included (reproducible trajectories).
    context.execution_options.preserve_order = not cfg.train.shuffle or cfg.train.deterministic
    if datasets is None:
        for key in ("synthetic", "real"):
            if not getattr(cfg.data, key):
                raise SystemExit(f"data.{key} is not set: pass --set data.{key}=URI (made by simulate or ingest)")
        check_corpora(cfg)
        # Only the image column already; a select on top would re-run on every epoch of a cached corpus.
        datasets = {key: _open_dataset(getattr(cfg.data, key), cfg, holdout=key == "real")
                    for key in ("synthetic", "real")}
    else:
        datasets = {key: ds.select_columns(["image"]) for key, ds in datasets.items()}
    cfg = _absolute_local_paths(cfg)
    storage_filesystem = None
    if storage.is_s3(cfg.train.storage_path):
        storage_filesystem, storage_path = storage.resolve(cfg.train.storage_path, cfg.storage)
    else:
        storage_path = cfg.train.storage_path
    latest = check_resumable(cfg)
    image_shape = (cfg.model.image_channels, cfg.model.image_height, cfg.model.image_width)
    run = history_run_id(cfg)
    if cfg.train.eval_every:  # the best checkpoints by the label-free objective, besides the latest
        checkpoint_config = CheckpointConfig(num_to_keep=cfg.train.keep_best, checkpoint_score_attribute="objective",
                                             checkpoint_score_order="min")
    else:
        checkpoint_config = CheckpointConfig(num_to_keep=cfg.train.keep_best)

    data_config = DataConfig(datasets_to_split="all")  # carries preserve_order over from the context
    # Workers' output stays in Ray's logs unless --verbose: rank 0 sends its progress lines here.
    # On this (the driver's) node: on a worker node, a preemption would take rank 0's channel with it.
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})
    console.say(f"train: run {cfg.train.name!r} in {storage.join(cfg.train.storage_path, cfg.train.name)}, "
                    f"{resources.describe(worker_resources, cfg)}")
    tracker = tracking.training_run(cfg, resume_from=latest, parent=mlflow_parent)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The loop config is redacted (Config.to_dict); credentials reach the workers' environment.
        train_loop_config={"config": cfg.to_dict(), "history_run": run, "progress": progress,
                           "mlflow_run": tracker.run_id, "rungs": rungs,
                           "env": share_env({**storage.worker_env(cfg.storage), **tracking.worker_env()})},
        # Ray's default placement (PACK), also for CPU workers: spread over nodes, they can leave no
        # node a whole free CPU, which Ray's rebuild of corpus blocks lost with a node needs (the
        # restarted workers then waited for their first batch forever on 1-CPU nodes).
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=cfg.train.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=worker_group_start_retries(cfg)),
            checkpoint_config=checkpoint_config, callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=data_config,
    )
    done = threading.Event()
    printer = threading.Thread(target=console.progress_printer, args=(progress, done), daemon=True)
    dh.create_shards(run, cfg.train.buffer_size * cfg.train.num_workers, image_shape, cfg.train.buffer_shards,
                     cfg.train.seed + 3, wide=wide_codes(cfg.model))
    printer.start()
    try:
        with tracker:  # FAILED when fit raises
            result = trainer.fit()
            if result.checkpoint:
                tracker.tags({"simgan.checkpoint": checkpoint_uri(cfg, result.checkpoint)})
        return result
    except TrainingFailedError as exc:
        # What failed, in one line, instead of the traceback of every worker (those stay in Ray's logs).
        raise TrainingError(
            f"run {cfg.train.name!r} failed: {_what_failed(exc, worker_resources, cfg)}. The same command continues "
            f"it from its latest checkpoint in {storage.join(cfg.train.storage_path, cfg.train.name)}") from exc
    finally:
        done.set()
        printer.join(timeout=10)
        progress.shutdown()
        dh.destroy_shards(run, cfg.train.buffer_shards)


def _what_failed(error: BaseException, worker_resources: dict[str, float], cfg: Config) -> str:
    """The failure line's middle: for workers that could not be placed again (their nodes lost, none
    joined in time), what is missing; else the error's own last line."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from simgan_dist import console

    if isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
        tries = worker_group_start_retries(cfg) + 1
        return (f"its {cfg.train.num_workers} worker(s) ({', '.join(f'{v:g} {k}' for k, v in worker_resources.items())}"
                f" each) could not be placed again in {tries} tries: the nodes they ran on were lost and the cluster "
                "has not got those resources back (set train.resource_wait_s to wait longer for replacement nodes)")
    return console.failure_line(error)


def worker_group_start_retries(cfg: Config) -> int:
    """How often Ray Train may retry starting the worker group when the cluster lacks its resources (the
    whole pool lost, no replacement nodes). Each try waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s)
    and Ray Train's default retries forever: a run then hung without a word. Enough tries to cover
    train.resource_wait_s, at least one (a replacement node joins within a minute or two)."""
    import math
    import os

    per_try = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(1, math.ceil(cfg.train.resource_wait_s / per_try))


def check_corpora(cfg: Config) -> None:
    """Before any worker starts: the datasets are of the kinds their keys take (roles.py), and both
    corpora are finished datasets of the model's image shape, each large enough for one batch on
    every worker (batches drop the remainder)."""
    from simgan_dist.data.roles import check_data_roles
    from simgan_dist.data.schema import load_numpy, read_manifest
    from simgan_dist.data.splits import holds_out_real, validation_mask

    check_data_roles(cfg)
    expected = [cfg.model.image_height, cfg.model.image_width, cfg.model.image_channels]
    need = cfg.train.batch_size * cfg.train.num_workers
    for key in ("synthetic", "real"):
        uri = getattr(cfg.data, key)
        manifest = read_manifest(uri, cfg.storage)
        if list(manifest.image_shape) != expected:
            raise UserError(f"data.{key} {uri}: images are {manifest.image_shape} (HxWxC), the model "
                            f"(model.image_height/width/channels) expects {expected}")
        rows, held = manifest.rows, ""
        if key == "real" and holds_out_real(cfg) and rows < 4 * need:  # ids are cheap to read when few
            ids = load_numpy(uri, cfg.storage, columns=["id"])["id"]
            rows -= int(validation_mask(ids, cfg.data.real_val_fraction).sum())
            held = " once the objective's validation rows (data.real_val_fraction) are held out"
        if rows < need:
            raise UserError(f"data.{key} {uri}: {rows} rows{held}, fewer than one batch per worker "
                            f"(train.batch_size {cfg.train.batch_size} x train.num_workers "
                            f"{cfg.train.num_workers} = {need})")


def check_resumable(cfg: Config) -> str | None:
    """The run's latest complete checkpoint (None for a new run), once checked.

    A run name reused with settings its checkpoint cannot continue under is refused up front,
    not deep inside DeepSpeed on every worker: another model shape, another history sharding,
    or ZeRO-partitioned optimizer state restored at another worker count. Other changes of data,
    loss or optimizer settings need `train.allow_config_change` (`checkpoint.check_config_changes`)."""
    from pyarrow import fs as pafs

    from simgan_dist.data import storage
    from simgan_dist.train.checkpoint import CONFIG_FILE, check_config_changes, load_checkpoint_config

    run_uri = storage.join(cfg.train.storage_path, cfg.train.name)
    filesystem, base = storage.resolve(run_uri, cfg.storage)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError as exc:
        raise storage.explain(exc, run_uri, "list the run's checkpoints") from exc
    folders = sorted(i.base_name for i in infos
                     if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    complete = [f for f in folders
                if filesystem.get_file_info(f"{base}/{f}/{CONFIG_FILE}").type == pafs.FileType.File]
    if not complete:
        return None
    latest = storage.join(run_uri, complete[-1])
    saved = load_checkpoint_config(latest, cfg.storage)
    problems = [f"model.{k}: {v!r} there, {getattr(cfg.model, k)!r} now"
                for k, v in saved.model.__dict__.items() if getattr(cfg.model, k) != v]
    if saved.train.buffer_shards != cfg.train.buffer_shards:
        problems.append(f"train.buffer_shards: {saved.train.buffer_shards} there, {cfg.train.buffer_shards} now")
    if (saved.train.zero_stage or cfg.train.zero_stage) and (saved.train.zero_stage, saved.train.num_workers) != (
            cfg.train.zero_stage, cfg.train.num_workers):
        problems.append(f"train.zero_stage/num_workers: {saved.train.zero_stage}/{saved.train.num_workers} there, "
                        f"{cfg.train.zero_stage}/{cfg.train.num_workers} now (ZeRO partitions the optimizer "
                        "state per worker)")
    if problems:
        raise UserError(f"train.name {cfg.train.name!r} already has a run at {run_uri} that this config cannot "
                        f"continue ({'; '.join(problems)}): choose another train.name or storage_path")
    check_config_changes(saved, cfg, run_uri, latest)
    return latest


def _open_dataset(uri: str, cfg: Config, holdout: bool = False):
    """The images of a dataset; held in the object store when they fit in a quarter of it.

    Every pass over a shard is a new epoch: streaming from storage again costs seconds of
    start-up each time, which small corpora (the real set above all) would pay often.
    `holdout`: skip the real validation rows the objective scores against (objective.py).
    """
    import ray

    from simgan_dist.data.pipeline import read_dataset
    from simgan_dist.data.schema import read_manifest
    from simgan_dist.data.splits import drop_validation_rows, holds_out_real

    manifest = read_manifest(uri, cfg.storage)
    if holdout and holds_out_real(cfg):
        dataset = read_dataset(uri, cfg.storage, columns=["id", "image"]).map_batches(
            drop_validation_rows, fn_kwargs={"fraction": cfg.data.real_val_fraction}, batch_format="numpy")
    else:
        dataset = read_dataset(uri, cfg.storage, columns=["image"])
    budget = ray.cluster_resources().get("object_store_memory", 0) / 4
    return dataset.materialize() if manifest.rows * manifest.layout.image_nbytes <= budget else dataset


def checkpoint_uri(cfg: Config, checkpoint) -> str:
    """Where a result's checkpoint lives, as a URI `refine --checkpoint` accepts."""
    from simgan_dist.data import storage

    if storage.is_s3(cfg.train.storage_path):
        return f"s3://{checkpoint.path}"
    return checkpoint.path


def cli_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    if args.local:
        from simgan_dist.train.local import train_local

        if "://" in cfg.train.storage_path:
            raise SystemExit("train --local writes to a local folder: set train.storage_path to a path")
        run = train_local(cfg, Path(cfg.train.storage_path) / cfg.train.name)
        print(f"checkpoint: {run.checkpoint}")
        print(f"images and TensorBoard logs: {run.folder}")
        return 0
    result = fit(cfg)
    from simgan_dist.data import storage

    monitor = storage.join(cfg.train.storage_path, cfg.train.name, "monitor")
    print(f"checkpoint: {checkpoint_uri(cfg, result.checkpoint)}")
    print(f"images and TensorBoard logs: {monitor} (tensorboard --logdir {storage.join(monitor, 'tensorboard')})")
    print(f"metrics per report: {storage.join(monitor, 'metrics.jsonl')}")
    return 0
