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
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simgan_dist.config import Config, config_from_dict, load_config
from simgan_dist.core.host_memory import reuse_freed_memory
from simgan_dist.core.imaging import to_host, wide_codes
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.errors import UserError

PREVIEW = 8
CHUNK_BATCHES = 8  # batches per Ray Data fetch (ShardStream)
QUEUED_CHUNKS = 2  # fetched ahead of the training thread, per stream
_EPOCH_END = object()
DS_TAG = "engine"  # DeepSpeed writes a file named "latest" beside the tag folder


class TrainingError(UserError, RuntimeError):
    """A training run that failed once its restarts (train.max_failures) were used up."""


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
    """The engines' config: fp32 master weights, bf16 compute through torch autocast, no wrapper optimizer.

    With `"bf16": {"enabled": true}` DeepSpeed would hold bf16 weights and wrap the client
    optimizer in an fp32-master wrapper whose overflow check calls `.item()` parameter by
    parameter: dozens of host syncs per step. Its `torch_autocast` section instead keeps
    the weights fp32, runs convolutions in bf16 and hands our (fused, on CUDA) optimizer
    to the engine unwrapped under ZeRO-0, so a step never waits on the host.

    ZeRO stages: R and D hold ~0.3M parameters (Adam state ~4 MB), so partitioning optimizer
    states (ZeRO-1) or gradients too (ZeRO-2) saves nothing that matters and adds a
    gradient-norm/overflow `.item()` per step plus a partitioned all-gather. They pay off when
    parameters + Adam state (16 bytes per parameter) are a real share of GPU memory: from
    hundreds of millions of parameters (stage 1), with large gradient buffers too (stage 2).
    Stage 0 is the default; 1 and 2 stay selectable and tested.
    """
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults to 1.0; the paper does not clip
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 1 << 30,
    }


def build_engines(cfg: Config, device: torch.device, bf16: bool,
                  memory_format: torch.memory_format = torch.contiguous_format) -> tuple[Any, Any]:
    """R's and D's DeepSpeed engines, with identical initial weights on every rank.

    The optimizers come from `algorithm.make_optimizer` (train.optimizer/betas/lr/lr_disc), fused
    on every device: one kernel, and the step counter stays a device tensor (no .item() per step).
    """
    import deepspeed

    from simgan_dist.core.algorithm import make_optimizer

    torch.manual_seed(cfg.train.seed)
    engines = []
    for role, module in (("refiner", build_refiner(cfg.model)), ("disc", build_discriminator(cfg.model))):
        module = module.to(device, memory_format=memory_format)
        engine, *_ = deepspeed.initialize(
            model=module, config=deepspeed_config(cfg, bf16),
            optimizer=make_optimizer(module.parameters(), cfg.train, role, device),
        )
        load_as_data(engine)
        if engine.dp_world_size == 1 and not cfg.train.zero_stage:
            # One rank has nothing to average: DeepSpeed would still copy every gradient into a
            # flat buffer, all-reduce it and copy it back, ~3% of a tiny-preset step on CPU.
            engine.enable_backward_allreduce = False
        if cfg.train.compile:
            engine.compile()  # compiles engine.module in place: the bare-module calls use it too
        engines.append(engine)
    return engines[0], engines[1]


class ShardStream:
    """Endless batches from a worker's Ray Data shard: each exhausted pass starts a new epoch.

    Ray Data hands over chunks of CHUNK_BATCHES batches, served here slice by slice: its own cost
    per batch (shuffle-buffer take, Arrow to torch conversion, collation) is 1.2 ms of CPU at the
    tiny preset's batch of 32, about 5x what the same rows cost in fetches of 128 without Ray's
    shuffle (bench/RESULTS.md, issue 11 (b)). A background thread fetches them, QUEUED_CHUNKS
    ahead, and starts the next epoch as soon as one is read: an epoch's start (a round trip to
    the split coordinator and a new execution, ~80 ms at the demo's size) overlaps the steps
    instead of stalling one. With `shuffle`, each chunk (with the previous chunk's remainder) is
    permuted on the device, in the training thread (its RNG stream): a local shuffle over 8
    batches, where Ray's shuffle buffer held 4. An epoch's last partial batch is dropped, so an
    unshuffled run sees exactly the local trainer's batches.
    """

    def __init__(self, shard, batch_size: int, to_input, shuffle: bool):
        self.shard = shard
        self.batch_size = batch_size
        self.to_input = to_input
        self.shuffle = shuffle
        self.wait_s = 0.0
        self.preview: np.ndarray | None = None  # kept on the host: batches arrive on the worker's device
        self.rows: torch.Tensor | None = None  # this epoch's images not served yet
        self.chunks: queue.Queue = queue.Queue(maxsize=QUEUED_CHUNKS)
        self.closed = threading.Event()
        threading.Thread(target=self._fetch, name="shard-stream", daemon=True).start()

    def _fetch(self) -> None:
        """Chunks, then _EPOCH_END, epoch after epoch; an exception is handed on and ends it."""
        try:
            while True:
                for batch in self.shard.iter_torch_batches(batch_size=CHUNK_BATCHES * self.batch_size,
                                                           prefetch_batches=1):
                    if not self._put(batch["image"]):
                        return
                if not self._put(_EPOCH_END):
                    return
        except BaseException as exc:  # raised in the training thread at its next batch
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.closed.is_set():
            try:
                self.chunks.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def _refill(self) -> bool:
        """Append the next chunk; at the end of the epoch drop the remainder instead (returns True)."""
        chunk = self.chunks.get()
        if chunk is _EPOCH_END:
            self.rows = None
            return True
        if isinstance(chunk, BaseException):
            raise chunk
        rows = chunk if self.rows is None else torch.cat([self.rows, chunk])
        self.rows = rows[torch.randperm(len(rows), device=rows.device)] if self.shuffle else rows
        return False

    def __call__(self) -> torch.Tensor:
        start = time.perf_counter()
        epochs = 0
        while self.rows is None or len(self.rows) < self.batch_size:
            epochs += self._refill()
            if epochs > 1:
                raise RuntimeError(f"this worker's data shard holds fewer rows than one batch ({self.batch_size})")
        images, self.rows = self.rows[:self.batch_size], self.rows[self.batch_size:]
        self.wait_s += time.perf_counter() - start
        if self.preview is None:
            self.preview = to_host(images[:PREVIEW])
        return self.to_input(images)

    def close(self) -> None:
        """Stop fetching (the thread ends at its next chunk)."""
        self.closed.set()


class MonitorSink:
    """Rank 0's TensorBoard, metrics.jsonl and image grids, kept under `<storage>/<name>/monitor`.

    On S3 they are written to a local folder and mirrored by a background thread
    (`monitor.FolderMirror`), so no rank waits for uploads at a report.
    """

    def __init__(self, cfg: Config):
        from simgan_dist.data import storage
        from simgan_dist.train.monitor import FolderMirror, RunLog

        remote = storage.join(cfg.train.storage_path, cfg.train.name, "monitor")
        self.mirror = None
        if storage.is_s3(remote):
            self.mirror = FolderMirror(tempfile.mkdtemp(prefix="simgan-monitor-"), remote, cfg.storage)
            self.mirror.restore()
            self.mirror.start()
            folder = self.mirror.folder
        else:
            folder = storage.resolve(remote)[1]
        self.log = RunLog(folder)

    def sync(self) -> None:
        if self.mirror:
            self.log.tb.flush()
            self.mirror.sync()

    def close(self) -> None:
        self.log.close()
        if self.mirror:
            self.mirror.close()


def load_as_data(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files as data.

    DeepSpeed 0.19 loads them with `torch.load(weights_only=False)`, which runs any code
    pickled into a file; `load_data` refuses such a file. ZeRO optimizer files also hold
    a loss scaler, the ZeRO stage enum and fragment addresses: plain data classes,
    allowed by name.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from simgan_dist.train.checkpoint import load_data

    def load(path: str, map_location: Any = None) -> Any:
        return load_data(path, f"DeepSpeed checkpoint file {os.path.basename(path)}", map_location,
                         allowed=(LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address))

    engine.checkpoint_engine.load = load


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    from simgan_dist.data.pipeline import adopt_env

    adopt_env(loop_config.get("env"))
    reuse_freed_memory()
    cfg = config_from_dict(loop_config["config"])
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from simgan_dist.core.algorithm import EmaWeights, Schedule, SimGAN
    from simgan_dist.core.imaging import to_model_input
    from simgan_dist.core.losses import RefinerLoss
    from simgan_dist.metrics.objective import score_text, write_scores
    from simgan_dist.train import distributed_history as dh
    from simgan_dist.train.checkpoint import (
        REFINER_FILE,
        STATE_FILE,
        load_data,
        rng_state,
        set_rng_state,
        write_checkpoint,
    )
    from simgan_dist.train.monitor import MetricAverager, progress_line

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    say = functools.partial(_say, channel=loop_config.get("progress"))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    channels_last = cfg.train.channels_last and on_gpu
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    r_engine, d_engine = build_engines(cfg, device, bf16, memory_format)
    # Every rank keeps the same EMA (same weights after each all-reduced step); rank 0 saves it.
    ema = EmaWeights(r_engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
    refining = ema.module if ema else r_engine.module  # what refiner.pt holds and the previews show

    # fp32 inputs: autocast runs the convolutions in bf16, the regularisation loss compares exact values.
    to_input = functools.partial(to_model_input, device=device, channels_last=channels_last)
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
                ema.module.load_state_dict(load_data(os.path.join(folder, REFINER_FILE), f"checkpoint {REFINER_FILE}",
                                                     device))
            state = load_data(os.path.join(folder, STATE_FILE), f"checkpoint {STATE_FILE}")
            rank_rng = os.path.join(folder, f"rng_rank{rank}.pt")
            if os.path.exists(rank_rng):
                set_rng_state(load_data(rank_rng, f"checkpoint rng_rank{rank}.pt"))
            if rank == 0:
                history_restored = dh.load_shards(shards, state["history"])
        restored_from = sum(state["algorithm"].values())
    elif rank == 0:
        dh.clear_shards(shards)
    dist.barrier()  # nobody samples the buffer before rank 0 restored or cleared it

    history = dh.SharedHistory(shards, sample_size=cfg.train.batch_size // 2, device=device,
                               wide=wide_codes(cfg.model))
    # The engines autocast their own forward; R's adversarial loss and the D step's refined half
    # go through the bare modules, which need the same context.
    autocast = (functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext)
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
        from simgan_dist.metrics.objective import Evaluator

        evaluator = Evaluator.from_config(cfg)
    averager = MetricAverager()
    images, wait_mark, clock, saved_at = 0, 0.0, time.perf_counter(), time.monotonic()
    restarts_said = 0
    while not algo.done:
        phase = algo.phase
        averager.add(algo.advance())
        images += cfg.train.batch_size * (cfg.train.k_g + cfg.train.k_d if phase == "adversarial" else 1)
        step = algo.global_step
        # Every evaluation comes with a checkpoint, so the best-scored weights can be kept.
        evaluate = bool(cfg.train.eval_every) and (step % cfg.train.eval_every == 0 or algo.done)
        report = step % cfg.train.report_every == 0 or algo.done or evaluate
        save = step % cfg.train.checkpoint_every == 0 or algo.done or evaluate
        if report and not save and cfg.train.checkpoint_every_s:
            save = _time_to_save(saved_at, cfg.train.checkpoint_every_s, device)
        if not (report or save):
            continue
        elapsed = time.perf_counter() - clock
        wait = synthetic.wait_s + real.wait_s
        metrics = {
            **averager.pop(), "step": step, "phase": phase,
            "images_per_s": images * world / max(elapsed, 1e-9),
            "data_wait_s": wait - wait_mark,
            "buffer_fill": len(history) / (cfg.train.buffer_size * world),
            "restored_from_step": restored_from, "history_restored": history_restored,
            "history_run": loop_config["history_run"], "history_restarts": len(history.restarts),
        }
        if evaluator is not None and evaluate:
            # The weights the checkpoint holds and refine uses (the EMA when there is one): fp32
            # weights and inputs, bf16 convolutions under autocast, as in training (and train --local)
            with autocast():
                metrics.update(evaluator(refining, device))
        elif evaluator is not None and save:
            # Ray Train ranks every checkpoint by "objective" and would rank a missing one first;
            # NaN ranks last (kept only while it is the latest).
            metrics["objective"] = float("nan")
        if sink and (step % cfg.train.image_every == 0 or algo.done):
            sink.log.image(step, _preview_grid(refining, to_input, synthetic.preview, real.preview))
        if sink and len(history.restarts) > restarts_said:
            # Deliberately not fatal: the shard refills from the next D steps; the run should not roll back.
            shards_lost = sorted(set(history.restarts[restarts_said:]))
            say(f"[{cfg.train.name}] warning: history shard(s) {shards_lost} lost their actor and came back empty "
                f"by step {step}; training goes on while they refill ({len(history)} images in the buffer now)")
            restarts_said = len(history.restarts)
        if sink:
            sink.log.write(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            say(progress_line(step, algo.total_steps, phase, metrics) + score_text(metrics))
            sink.sync()
        if save:
            history.flush()
            dist.barrier()  # every rank's pushes have landed before rank 0 reads the buffer
            # Written to local disk here; Ray uploads it in the background and then deletes it.
            folder = tempfile.mkdtemp(prefix="simgan-ckpt-")
            r_engine.save_checkpoint(os.path.join(folder, "deepspeed", "refiner"), tag=DS_TAG)
            d_engine.save_checkpoint(os.path.join(folder, "deepspeed", "discriminator"), tag=DS_TAG)
            torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))
            if rank == 0:
                write_checkpoint(folder, cfg, refining, d_engine.module, {
                    "algorithm": algo.state_dict(), "history": dh.save_shards(shards),
                })
                if evaluator is not None and evaluate:
                    write_scores(folder, step, metrics)
            # Ray Train hears only of checkpoints (every evaluation and the last step are ones): each
            # report waits until its controller has taken the previous one, which it polls every 2 s
            # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report per progress line capped training at one
            # line per poll. Progress lines and metrics.jsonl above keep every report.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            saved_at = time.monotonic()
        images, wait_mark, clock = 0, wait, time.perf_counter()
    synthetic.close()
    real.close()
    history.close()
    if sink:
        sink.close()


def _time_to_save(saved_at: float, every_s: float, device: torch.device) -> bool:
    """Rank 0's clock decides for everyone (ranks must agree on checkpointing); called at reports only."""
    import torch.distributed as dist

    due = torch.tensor([time.monotonic() - saved_at >= every_s], dtype=torch.uint8, device=device)
    dist.broadcast(due, src=0)
    return bool(to_host(due)[0])


def _preview_grid(refiner: torch.nn.Module, to_input, synthetic: np.ndarray, real: np.ndarray | None
                  ) -> np.ndarray:
    """synthetic | refined | real, as the model sees them (depth shown normalised around the hand)."""
    from simgan_dist.core.imaging import to_storage
    from simgan_dist.train.monitor import comparison_grid

    with torch.no_grad():
        x = to_input(synthetic)
        rows = [to_storage(x), to_storage(refiner(x))]
        rows.append(to_storage(to_input(real)) if real is not None else None)
    return comparison_grid(*rows)


def fit(cfg: Config, datasets: dict[str, Any] | None = None, callbacks: list | None = None,
        worker_resources: dict[str, float] | None = None):
    """Train on the connected Ray cluster (or a local one); returns the ray.train.Result.

    `datasets` ({"synthetic", "real"} Ray Datasets with a uint8 N×H×W×C `image` column)
    replaces reading `data.synthetic` / `data.real`. `callbacks`: Ray Train callbacks (Tune's
    report callback in a sweep). `worker_resources`: each worker's share, as planned by a sweep
    for its concurrent trials; by default `resources.training_resources` plans it on the
    connected cluster (and fails at once when the run cannot fit). The run's history-buffer
    actors are removed when it ends, however it ends.
    """

    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from simgan_dist import console, ray_cluster
    from simgan_dist.data import storage
    from simgan_dist.data.pipeline import share_env
    from simgan_dist.train import distributed_history as dh
    from simgan_dist.train import resources

    ray_cluster.connect()
    if worker_resources is None:
        worker_resources = resources.training_resources(cfg)
    context = ray.data.DataContext.get_current()
    # Our progress line says what matters; per-epoch Ray Data bars would bury it.
    context.enable_progress_bars = False
    # Unshuffled runs read in stored order, caching included (reproducible trajectories).
    context.execution_options.preserve_order = not cfg.train.shuffle
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
    storage_filesystem = None
    if storage.is_s3(cfg.train.storage_path):
        storage_filesystem, storage_path = storage.resolve(cfg.train.storage_path, cfg.storage)
    else:
        # Workers run in other folders: a relative path must mean the same place to all of them.
        cfg = config_from_dict(cfg.to_dict(redact=False))
        cfg.train.storage_path = storage_path = storage.resolve(cfg.train.storage_path)[1]
    check_resumable(cfg)
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
    console.say(f"train: run {cfg.train.name!r} in {storage.join(cfg.train.storage_path, cfg.train.name)}, "
                    f"{resources.describe(worker_resources, cfg)}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The loop config is redacted (Config.to_dict); credentials reach the workers' environment.
        train_loop_config={"config": cfg.to_dict(), "history_run": run, "progress": progress,
                           "env": share_env(storage.worker_env(cfg.storage))},
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
    printer = threading.Thread(target=console.progress_printer, args=(progress, done), daemon=True)
    dh.create_shards(run, cfg.train.buffer_size * cfg.train.num_workers, image_shape, cfg.train.buffer_shards,
                     cfg.train.seed + 3, wide=wide_codes(cfg.model))
    printer.start()
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        # What failed, in one line, instead of the traceback of every worker (those stay in Ray's logs).
        raise TrainingError(
            f"run {cfg.train.name!r} failed: {console.failure_line(exc)}. The same command continues it from "
            f"its latest checkpoint in {storage.join(cfg.train.storage_path, cfg.train.name)}") from exc
    finally:
        done.set()
        printer.join(timeout=10)
        progress.shutdown()
        dh.destroy_shards(run, cfg.train.buffer_shards)


def check_corpora(cfg: Config) -> None:
    """Before any worker starts: both corpora are finished datasets of the model's image shape,
    each large enough for one batch on every worker (batches drop the remainder)."""
    from simgan_dist.data.schema import load_numpy, read_manifest
    from simgan_dist.data.splits import holds_out_real, validation_mask
    from simgan_dist.errors import UserError

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


def check_resumable(cfg: Config) -> None:
    """A run name reused with settings its checkpoint cannot continue under is refused up front,
    not deep inside DeepSpeed on every worker: another model shape, another history sharding,
    or ZeRO-partitioned optimizer state restored at another worker count."""
    from pyarrow import fs as pafs

    from simgan_dist.data import storage
    from simgan_dist.errors import UserError
    from simgan_dist.train.checkpoint import CONFIG_FILE, load_checkpoint_config

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
        return
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
