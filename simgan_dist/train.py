"""`simgan-dist train`: Ray Train + DeepSpeed data-parallel SimGAN, or --local for one process.

Each worker runs the same Algorithm 1 (`algorithm.SimGAN`) as the local trainer, with R and
D in DeepSpeed engines, batches from its Ray Data shards and one history buffer shared by
all workers (`distributed_history`). Every checkpoint holds both engines, the schedule
counters, per-rank RNG states and the buffer; a restarted worker group, or a resubmitted
job with the same `train.name` and `train.storage_path`, continues from the latest one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from simgan_dist.config import Config, config_from_dict, load_config

PREVIEW = 8
DS_TAG = "engine"  # DeepSpeed writes a file named "latest" beside the tag folder


def history_run_id(cfg: Config) -> str:
    """One buffer per run: the run name plus where it is stored."""
    where = hashlib.sha1(cfg.train.storage_path.encode()).hexdigest()[:8]
    return f"{cfg.train.name}-{where}"


def _say(line: str, channel=None) -> None:
    """Rank 0's console line: to the driver through `channel` when it gave one, else to stdout
    (Ray Train's patched print() would show it twice)."""
    if channel is not None:
        channel.put_nowait(line)
        return
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class DeepSpeedUpdater:
    """The `Updater` interface of algorithm.py over a DeepSpeed engine."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # also zeroes the gradients


def deepspeed_config(cfg: Config, bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults to 1.0; the paper does not clip
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
    }


class ShardStream:
    """Endless batches from a worker's Ray Data shard: each exhausted pass starts a new epoch."""

    def __init__(self, shard, batch_size: int, to_input, shuffle: bool):
        self.shard = shard
        self.batch_size = batch_size
        self.to_input = to_input
        self.shuffle_buffer = 4 * batch_size if shuffle else None
        self.wait_s = 0.0
        self.preview: torch.Tensor | None = None
        self.batches = self._epoch()

    def _epoch(self):
        return iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=self.shuffle_buffer,
        ))

    def __call__(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = self._epoch()
            batch = next(self.batches)
        self.wait_s += time.perf_counter() - start
        images = batch["image"]
        if self.preview is None:
            self.preview = images[:PREVIEW].cpu().clone()  # kept on the host: the image grid reads it with .numpy()
        return self.to_input(images)


class MonitorSink:
    """Rank 0's TensorBoard, metrics.jsonl and image grids, kept under `<storage>/<name>/monitor`."""

    def __init__(self, cfg: Config):
        from simgan_dist.data import storage
        from simgan_dist.monitor import RunLog

        self.remote = storage.join(cfg.train.storage_path, cfg.train.name, "monitor")
        self.is_remote = storage.is_s3(self.remote)
        folder = tempfile.mkdtemp(prefix="simgan-monitor-") if self.is_remote else storage.resolve(self.remote)[1]
        self.log = RunLog(folder)
        self.storage_cfg = cfg.storage

    def sync(self) -> None:
        if self.is_remote:
            from pyarrow import fs as pafs

            from simgan_dist.data import storage

            self.log.tb.flush()
            filesystem, path = storage.resolve(self.remote, self.storage_cfg)
            pafs.copy_files(str(self.log.folder), path, destination_filesystem=filesystem)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = config_from_dict(loop_config["config"])
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from simgan_dist import distributed_history as dh
    from simgan_dist.algorithm import EmaWeights, Schedule, SimGAN, make_optimizer
    from simgan_dist.checkpoint import REFINER_FILE, STATE_FILE, rng_state, set_rng_state, write_checkpoint
    from simgan_dist.imaging import to_model_input, to_storage
    from simgan_dist.losses import RefinerLoss
    from simgan_dist.models import build_discriminator, build_refiner
    from simgan_dist.monitor import MetricAverager, comparison_grid, progress_line
    from simgan_dist.objective import score_text, write_scores

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    say = functools.partial(_say, channel=loop_config.get("progress"))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    channels_last = cfg.train.channels_last and on_gpu
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    engines = []
    for role, module in (("refiner", build_refiner(cfg.model)), ("disc", build_discriminator(cfg.model))):
        module = module.to(device, memory_format=memory_format)
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=make_optimizer(module.parameters(), cfg.train, role, device),
            config=deepspeed_config(cfg, bf16),
        )
        engines.append(engine)
    r_engine, d_engine = engines
    # Every rank keeps the same EMA (same weights after each all-reduced step); rank 0 saves it.
    ema = EmaWeights(r_engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
    refining = ema.module if ema else r_engine.module  # what refiner.pt holds and the previews show

    to_input = functools.partial(to_model_input, device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                                 channels_last=channels_last)
    synthetic = ShardStream(ray.train.get_dataset_shard("synthetic"), cfg.train.batch_size, to_input,
                            cfg.train.shuffle)
    real = ShardStream(ray.train.get_dataset_shard("real"), cfg.train.batch_size, to_input, cfg.train.shuffle)
    shards = dh.get_shards(loop_config["history_run"], cfg.train.buffer_shards)
    schedule = Schedule(cfg.train.pretrain_refiner_steps, cfg.train.pretrain_disc_steps, cfg.train.iterations,
                        cfg.train.k_g, cfg.train.k_d)

    restored_from, history_restored = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            r_engine.load_checkpoint(os.path.join(folder, "deepspeed", "refiner"), tag=DS_TAG)
            d_engine.load_checkpoint(os.path.join(folder, "deepspeed", "discriminator"), tag=DS_TAG)
            if ema:
                ema.module.load_state_dict(torch.load(os.path.join(folder, REFINER_FILE), map_location=device))
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
            rank_rng = os.path.join(folder, f"rng_rank{rank}.pt")
            if os.path.exists(rank_rng):
                set_rng_state(torch.load(rank_rng, weights_only=False))
            if rank == 0:
                history_restored = dh.load_shards(shards, state["history"])
        restored_from = sum(state["algorithm"].values())
    elif rank == 0:
        dh.clear_shards(shards)
    dist.barrier()  # nobody samples the buffer before rank 0 restored or cleared it

    history = dh.SharedHistory(shards, sample_size=cfg.train.batch_size // 2)
    autocast = contextlib.nullcontext  # DeepSpeed holds bf16 weights itself
    algo = SimGAN(DeepSpeedUpdater(r_engine), DeepSpeedUpdater(d_engine), RefinerLoss(cfg.loss), history,
                  schedule, synthetic, real, autocast, ema=ema, disc_noise=cfg.train.disc_noise)
    if checkpoint:
        algo.load_state_dict(state["algorithm"])
    if rank == 0 and restored_from:
        say(f"[{cfg.train.name}] resumed at step {restored_from}/{algo.total_steps} "
            f"with {history_restored} history images")

    sink = MonitorSink(cfg) if rank == 0 else None
    evaluator = None
    if rank == 0 and cfg.train.eval_every:
        from simgan_dist.objective import Evaluator

        evaluator = Evaluator.from_config(cfg)
    averager = MetricAverager()
    images, wait_mark, clock = 0, 0.0, time.perf_counter()
    while not algo.done:
        phase = algo.phase
        averager.add(algo.advance())
        images += cfg.train.batch_size * (cfg.train.k_g + cfg.train.k_d if phase == "adversarial" else 1)
        step = algo.global_step
        # Every evaluation comes with a checkpoint, so the best-scored weights can be kept.
        evaluate = bool(cfg.train.eval_every) and (step % cfg.train.eval_every == 0 or algo.done)
        report = step % cfg.train.report_every == 0 or algo.done or evaluate
        save = step % cfg.train.checkpoint_every == 0 or algo.done or evaluate
        if not (report or save):
            continue
        elapsed = time.perf_counter() - clock
        wait = synthetic.wait_s + real.wait_s
        metrics = {
            **averager.pop(), "step": step, "phase": phase,
            "images_per_s": images * world / max(elapsed, 1e-9),
            "data_wait_s": wait - wait_mark,
            "buffer_fill": len(history) / cfg.train.buffer_size,
            "restored_from_step": restored_from, "history_restored": history_restored,
            "history_run": loop_config["history_run"],
        }
        if evaluator is not None and evaluate:
            metrics.update(evaluator(r_engine.module, device, torch.bfloat16 if bf16 else torch.float32))
        elif evaluator is not None and save:
            # Ray Train ranks every checkpoint by "objective" and would rank a missing one first;
            # NaN ranks last (kept only while it is the latest).
            metrics["objective"] = float("nan")
        if sink and (step % cfg.train.image_every == 0 or algo.done):
            with torch.no_grad():
                refined = refining(to_input(synthetic.preview).to(next(refining.parameters()).dtype))
            real_preview = real.preview.numpy() if real.preview is not None else None
            sink.log.image(step, comparison_grid(synthetic.preview.numpy(), to_storage(refined), real_preview))
        if sink:
            sink.log.write(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            say(progress_line(step, algo.total_steps, phase, metrics) + score_text(metrics))
            sink.sync()
        with tempfile.TemporaryDirectory(prefix="simgan-ckpt-") as folder:
            checkpoint_out = None
            if save:
                history.flush()
                dist.barrier()  # every rank's pushes have landed before rank 0 reads the buffer
                r_engine.save_checkpoint(os.path.join(folder, "deepspeed", "refiner"), tag=DS_TAG)
                d_engine.save_checkpoint(os.path.join(folder, "deepspeed", "discriminator"), tag=DS_TAG)
                torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))
                if rank == 0:
                    write_checkpoint(folder, cfg, refining, d_engine.module, {
                        "algorithm": algo.state_dict(), "history": dh.save_shards(shards),
                    })
                    if evaluator is not None and evaluate:
                        write_scores(folder, step, metrics)
                checkpoint_out = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint_out)
        images, wait_mark, clock = 0, wait, time.perf_counter()
    if sink:
        sink.log.close()
        sink.sync()


def fit(cfg: Config, datasets: dict[str, Any] | None = None, callbacks: list | None = None,
        worker_resources: dict[str, float] | None = None):
    """Train on the connected Ray cluster (or a local one); returns the ray.train.Result.

    `datasets` ({"synthetic", "real"} Ray Datasets with a uint8 N×H×W×C `image` column)
    replaces reading `data.synthetic` / `data.real`. `callbacks`: Ray Train callbacks (Tune's
    report callback in a sweep). `worker_resources`: each worker's share, as planned by a sweep
    for its concurrent trials; by default `ray_cluster.training_resources` plans it on the
    connected cluster (and fails at once when the run cannot fit). The run's history-buffer
    actors are removed when it ends, however it ends.
    """
    import threading

    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from simgan_dist import distributed_history as dh
    from simgan_dist import ray_cluster
    from simgan_dist.data import storage

    ray_cluster.connect()
    if worker_resources is None:
        worker_resources = ray_cluster.training_resources(cfg)
    context = ray.data.DataContext.get_current()
    # Our progress line says what matters; per-epoch Ray Data bars would bury it.
    context.enable_progress_bars = False
    # Unshuffled runs read in stored order, caching included (reproducible trajectories).
    context.execution_options.preserve_order = not cfg.train.shuffle
    if datasets is None:
        for key in ("synthetic", "real"):
            if not getattr(cfg.data, key):
                raise SystemExit(f"data.{key} is not set: pass --set data.{key}=URI (made by simulate or ingest)")
        datasets = {key: _open_dataset(getattr(cfg.data, key), cfg, holdout=key == "real")
                    for key in ("synthetic", "real")}
    datasets = {key: ds.select_columns(["image"]) for key, ds in datasets.items()}
    storage_filesystem = None
    if storage.is_s3(cfg.train.storage_path):
        storage_filesystem, storage_path = storage.resolve(cfg.train.storage_path, cfg.storage)
    else:
        # Workers run in other folders: a relative path must mean the same place to all of them.
        cfg = config_from_dict(cfg.to_dict())
        cfg.train.storage_path = storage_path = storage.resolve(cfg.train.storage_path)[1]
    image_shape = (cfg.model.image_channels, cfg.model.image_height, cfg.model.image_width)
    run = history_run_id(cfg)
    if cfg.train.eval_every:  # the best checkpoints by the label-free objective, besides the latest
        checkpoint_config = CheckpointConfig(num_to_keep=cfg.train.keep_best, checkpoint_score_attribute="objective",
                                             checkpoint_score_order="min")
    else:
        checkpoint_config = CheckpointConfig(num_to_keep=cfg.train.keep_best)

    data_config = DataConfig(datasets_to_split="all")  # carries preserve_order over from the context
    # Workers' output stays in Ray's logs unless --verbose: rank 0 sends its progress lines here.
    progress = Queue(actor_options={"num_cpus": 0})
    ray_cluster.say(f"train: run {cfg.train.name!r} in {storage.join(cfg.train.storage_path, cfg.train.name)}, "
                    f"{ray_cluster.describe(worker_resources, cfg.train.num_workers)} "
                    f"(+{ray_cluster.DATA_CPUS:g} CPU for Ray Data)")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "history_run": run, "progress": progress},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=cfg.train.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=checkpoint_config, callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=data_config,
    )
    done = threading.Event()
    printer = threading.Thread(target=ray_cluster.progress_printer, args=(progress, done), daemon=True)
    dh.create_shards(run, cfg.train.buffer_size, image_shape, cfg.train.buffer_shards, cfg.train.seed + 3)
    printer.start()
    try:
        return trainer.fit()
    finally:
        done.set()
        printer.join(timeout=10)
        progress.shutdown()
        dh.destroy_shards(run, cfg.train.buffer_shards)


def _open_dataset(uri: str, cfg: Config, holdout: bool = False):
    """The images of a dataset; held in the object store when they fit in a quarter of it.

    Every pass over a shard is a new epoch: streaming from storage again costs seconds of
    start-up each time, which small corpora (the real set above all) would pay often.
    `holdout`: skip the real validation rows the objective scores against (objective.py).
    """
    import ray

    from simgan_dist.data.pipeline import read_dataset
    from simgan_dist.data.schema import read_manifest
    from simgan_dist.objective import drop_validation_rows, holds_out_real

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
        from simgan_dist.local_train import train_local

        if "://" in cfg.train.storage_path:
            raise SystemExit("train --local writes to a local folder: set train.storage_path to a path")
        run = train_local(cfg, Path(cfg.train.storage_path) / cfg.train.name)
        print(f"checkpoint: {run.checkpoint}")
        print(f"images and TensorBoard logs: {run.folder}")
        return 0
    result = fit(cfg)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    from simgan_dist.data import storage

    monitor = storage.join(cfg.train.storage_path, cfg.train.name, "monitor")
    print(f"checkpoint: {checkpoint_uri(cfg, result.checkpoint)}")
    print(f"images and TensorBoard logs: {monitor} (tensorboard --logdir {storage.join(monitor, 'tensorboard')})")
    print(f"metrics per report: {storage.join(monitor, 'metrics.jsonl')}")
    return 0
