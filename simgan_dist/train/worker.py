"""The per-worker loop of `simgan-dist train`: restore, stream, step, checkpoint.

Each worker runs the recipe `train --local` runs (recipe.py), with R and D in DeepSpeed engines
(engines.py), batches from its Ray Data shards (`ShardStream`) and one history buffer shared by
all workers (distributed_history). Every checkpoint holds both engines, the schedule counters,
per-rank RNG states and the buffer; a restarted worker group continues from the latest one.
"""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

from simgan_dist import tracking
from simgan_dist.config import Config, config_from_dict
from simgan_dist.core.host_memory import reuse_freed_memory
from simgan_dist.core.imaging import to_host, wide_codes
from simgan_dist.data import storage
from simgan_dist.train.recipe import (
    PREVIEW,
    Cadence,
    Precision,
    Throughput,
    build_simgan,
    evaluate,
    make_ema,
    preview_grid,
    refining,
    use_deterministic_kernels,
)
from simgan_dist.train.rungs import RungStop

CHUNK_BATCHES = 8  # batches per Ray Data fetch (ShardStream)
QUEUED_CHUNKS = 2  # fetched ahead of the training thread, per stream
_EPOCH_END = object()
POSITION_FILE = "position_rank{}.pt"  # a rank's place in its data streams and history draws (`_restore`)


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
    unshuffled run sees exactly the local trainer's batches. `state_dict` is the position in the
    epoch (chunks taken, rows left of them): a run resumed from it goes on where it stopped, given
    the same order of chunks (train.deterministic), instead of at the epoch's start.
    """

    def __init__(self, shard, batch_size: int, to_input, shuffle: bool):
        self.shard = shard
        self.batch_size = batch_size
        self.to_input = to_input
        self.shuffle = shuffle
        self.wait_s = 0.0
        self.preview: np.ndarray | None = None  # kept on the host: batches arrive on the worker's device
        self.rows: torch.Tensor | None = None  # this epoch's images not served yet
        self.taken = 0  # this epoch's chunks appended to rows so far
        self.skip = 0  # chunks a resumed stream passes over: served before its checkpoint
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

    def _take(self):
        chunk = self.chunks.get()
        if isinstance(chunk, BaseException):
            raise chunk
        return chunk

    def _refill(self) -> bool:
        """Append the next chunk; at the end of the epoch drop the remainder instead (returns True)."""
        chunk = self._take()
        while self.skip and chunk is not _EPOCH_END:
            self.skip -= 1
            chunk = self._take()
        self.skip = 0
        if chunk is _EPOCH_END:
            self.rows, self.taken = None, 0
            return True
        self.taken += 1
        rows = chunk if self.rows is None else torch.cat([self.rows.to(chunk.device), chunk])
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

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken, "rows": None if self.rows is None else torch.from_numpy(to_host(self.rows))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved position: this epoch's first `taken` chunks are passed over as they come."""
        self.skip, self.taken = state["taken"], state["taken"]
        self.rows = state["rows"]

    def close(self) -> None:
        """Stop fetching (the thread ends at its next chunk)."""
        self.closed.set()


def _print(line: str) -> None:
    """To this worker's stdout (Ray Train's patched print() would show it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ConsoleChannel:
    """Rank 0's console lines to the driver, through its `ray.util.queue.Queue`, without waiting on it.

    Each line is one call to the queue's actor whose reply is looked at later (`ray.wait` with no
    timeout), never awaited: a report costs the training thread no round trip (`Queue.put_nowait`
    is a blocking `ray.get`). A line whose call failed (the actor lost with its node) is printed
    to this worker's stdout instead, and so is every later one: none is dropped. `close()` waits
    for the last replies, so the run's final lines reach the driver before the worker exits.
    """

    def __init__(self, queue=None):
        self.actor = queue.actor if queue is not None else None
        self.pending: list[tuple[Any, str]] = []

    def say(self, line: str) -> None:
        if self.actor is None:
            _print(line)
            return
        self.pending.append((self.actor.put_nowait.remote(line), line))
        self._settle(timeout=0)

    def close(self, timeout: float = 10.0) -> None:
        self._settle(timeout)

    def _settle(self, timeout: float) -> None:
        import ray

        refs = [ref for ref, _ in self.pending]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False)[0]) if refs else set()
        # Lines leave in the order they were said: a later reply may come back (fail) before an earlier one.
        settled = next((i for i, ref in enumerate(refs) if ref not in ready), len(refs))
        for ref, line in self.pending[:settled]:
            try:
                ray.get(ref)
            except Exception:  # the channel's actor is gone: this worker's stdout (Ray's logs) from now on
                self.actor = None
                _print(line)
        self.pending = self.pending[settled:]


def deepspeed_accelerator_env(use_gpu: bool, environ) -> None:
    """DeepSpeed picks its accelerator from DS_ACCELERATOR at first use: the CPU one for CPU workers.
    A GPU worker drops an inherited DS_ACCELERATOR=cpu (a local instance's workers inherit the
    driver's environment, where the CPU tests set it), which would put DeepSpeed on the CPU beside a
    CUDA model."""
    if not use_gpu:
        environ.setdefault("DS_ACCELERATOR", "cpu")
    elif environ.get("DS_ACCELERATOR") == "cpu":
        del environ["DS_ACCELERATOR"]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    from simgan_dist.data.pipeline import adopt_env

    adopt_env(loop_config.get("env"))
    reuse_freed_memory()
    cfg = config_from_dict(loop_config["config"])
    deepspeed_accelerator_env(cfg.train.use_gpu, os.environ)
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from simgan_dist.metrics.objective import score_text
    from simgan_dist.train import distributed_history as dh
    from simgan_dist.train.engines import DeepSpeedUpdater, build_engines
    from simgan_dist.train.monitor import MetricAverager, MonitorSink, progress_line

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    console = ConsoleChannel(loop_config.get("progress") if rank == 0 else None)
    say = console.say
    precision = Precision.choose(cfg.train, ray.train.torch.get_device())
    device = precision.device
    # Rank 0's evaluator (reading data.synthetic and the held-out real images, maybe training the
    # realism network) before any collective: built later, the other ranks would wait for it inside
    # one (the first gradient all-reduce), up to the process group's timeout. It leaves the RNG as it was
    # (GazeFeatures forks it), so the trajectory does not depend on where it is built.
    use_deterministic_kernels(cfg.train)  # for the worker process's life
    evaluator = None
    if rank == 0 and cfg.train.eval_every:
        from simgan_dist.metrics.objective import Evaluator

        evaluator = Evaluator.from_config(cfg)
    engines = build_engines(cfg, device, precision.bf16, precision.memory_format)
    # Every rank keeps the same EMA (same weights after each all-reduced step); rank 0 saves it.
    ema = make_ema(cfg.train, engines[0].module)
    synthetic = ShardStream(ray.train.get_dataset_shard("synthetic"), cfg.train.batch_size, precision.to_input,
                            cfg.train.shuffle)
    real = ShardStream(ray.train.get_dataset_shard("real"), cfg.train.batch_size, precision.to_input,
                       cfg.train.shuffle)
    shards = dh.get_shards(loop_config["history_run"], cfg.train.buffer_shards)
    counters, history_restored, position = _restore(ray.train.get_checkpoint(), cfg, rank, world, engines, ema,
                                                    shards, device, loop_config.get("env"))
    dist.barrier()  # nobody samples the buffer before rank 0 restored or cleared it
    history = dh.SharedHistory(shards, sample_size=cfg.train.batch_size // 2, device=device,
                               wide=wide_codes(cfg.model), rank_of=(rank, world) if cfg.train.deterministic else None)
    if position is not None:
        synthetic.load_state_dict(position["synthetic"])
        real.load_state_dict(position["real"])
        history.restore_pending_sample(position["history"])
    algo = build_simgan(cfg, DeepSpeedUpdater(engines[0]), DeepSpeedUpdater(engines[1]), history, synthetic,
                        real, precision, ema)
    if counters is not None:
        algo.load_state_dict(counters)
    restored_from = algo.global_step
    if rank == 0 and restored_from:
        say(f"[{cfg.train.name}] resumed at step {restored_from}/{algo.total_steps} "
            f"with {history_restored} history images")
    # A sweep's trial stops at its rungs for the verdict; resumed at one, it asks again (recorded before).
    rungs = RungStop.attach(loop_config.get("rungs"), cfg, algo.total_steps)
    stopped = bool(rungs and restored_from and not rungs.goes_on(restored_from, say if rank == 0 else None))

    # Rank 0 alone logs to the MLflow run its driver made (none when untracked).
    tracker = tracking.Tracker.attach(tracking.tracking_uri(cfg), loop_config.get("mlflow_run"), say) \
        if rank == 0 else tracking.Tracker()
    sink = MonitorSink(cfg, tracker) if rank == 0 else None
    cadence, averager, throughput = Cadence.of(cfg.train), MetricAverager(), Throughput(cfg.train)
    wait_mark, saved_at, restarts_said = 0.0, time.monotonic(), 0
    while not (algo.done or stopped):
        phase = algo.phase
        averager.add(algo.advance())
        throughput.add(phase)
        step, done = algo.global_step, algo.done
        evaluated = cadence.should_eval(step, done)
        report = cadence.should_report(step, done)
        # Every evaluation comes with a checkpoint: Ray Train keeps the best-scored ones
        # (train --local keeps its best weights in best/ instead).
        save = cadence.should_checkpoint(step, done) or evaluated
        if report and not save and cfg.train.checkpoint_every_s:
            save = _time_to_save(saved_at, cfg.train.checkpoint_every_s, device)
        if not (report or save):
            continue
        wait = synthetic.wait_s + real.wait_s
        metrics = {
            **averager.pop(), "step": step, "phase": phase,
            "images_per_s": throughput.images_per_s(world),
            "data_wait_s": wait - wait_mark,
            "buffer_fill": len(history) / (cfg.train.buffer_size * world),
            "restored_from_step": restored_from, "history_restored": history_restored,
            "history_run": loop_config["history_run"], "history_restarts": len(history.restarts),
        }
        if evaluator is not None and evaluated:
            metrics.update(evaluate(evaluator, refining(algo), precision))
            if rungs:  # before the checkpoint: a trial resumed from it finds its value recorded
                rungs.record(step, metrics["objective"])
        elif evaluator is not None and save:
            # Ray Train ranks every checkpoint by "objective" and would rank a missing one first;
            # NaN ranks last (kept only while it is the latest).
            metrics["objective"] = float("nan")
        if sink:
            if cadence.should_save_images(step, done):
                sink.log.image(step, preview_grid(refining(algo), precision, synthetic.preview, real.preview))
            if len(history.restarts) > restarts_said:
                # Deliberately not fatal: the shard refills from the next D steps; the run should not roll back.
                shards_lost = sorted(set(history.restarts[restarts_said:]))
                say(f"[{cfg.train.name}] warning: history shard(s) {shards_lost} lost their actor and came back "
                    f"empty by step {step}; training goes on while they refill ({len(history)} images in the "
                    "buffer now)")
                restarts_said = len(history.restarts)
            sink.log.write(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            say(progress_line(step, algo.total_steps, phase, metrics) + score_text(metrics))
            sink.sync()
        if save:
            history.flush()
            dist.barrier()  # every rank's pushes have landed before rank 0 reads the buffer
            name = checkpoint_name(step)
            stored = storage.join(cfg.train.storage_path, cfg.train.name, name)
            position = {"world": world, "synthetic": synthetic.state_dict(), "real": real.state_dict(),
                        "history": history.pending_sample()}
            folder = _write_checkpoint(cfg, rank, engines, algo, shards, position, metrics if evaluated else None,
                                       stored, loop_config.get("env"))
            tracker.save_run(folder)
            tracker.tags({"simgan.checkpoint": stored})
            # Ray Train hears only of checkpoints (every evaluation and the last step are ones): each
            # report waits until its controller has taken the previous one, which it polls every 2 s
            # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report per progress line capped training at one
            # line per poll. Progress lines and metrics.jsonl above keep every report.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            saved_at = time.monotonic()
        if rungs and evaluated and not rungs.goes_on(step, say if rank == 0 else None):
            stopped = True
            if rank == 0:
                say(f"[{cfg.train.name}] stopped at step {step}/{algo.total_steps}: its objective is not among "
                    f"the best 1/{cfg.tune.reduction_factor} of the sweep's trials at this rung")
        throughput.restart()  # the next rate leaves out this report's and checkpoint's time
        wait_mark = wait
    synthetic.close()
    real.close()
    history.close()
    tracker.close()  # first: its queued image uploads read files in the sink's local folder, removed by sink.close
    if sink:
        sink.close()
    console.close()


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint at `step` in the run folder, known before Ray Train uploads it:
    the history shards write their files into it meanwhile (`distributed_history.save_shards`)."""
    return f"checkpoint_{step:09d}"


def _restore(checkpoint, cfg: Config, rank: int, world: int, engines: tuple, ema, shards: list,
             device: torch.device, env: list | None) -> tuple[dict[str, int] | None, int, dict | None]:
    """Load Ray Train's latest checkpoint into this rank's engines, EMA and RNG, and (rank 0) the
    history buffer; a fresh run's rank 0 clears the buffer instead. Returns the schedule counters
    (None for a fresh run), how many history images came back, and this rank's position in its data
    streams and its pending history sample (None when fresh, or saved by another number of workers,
    whose shards of the data were other rows)."""
    from simgan_dist.train import distributed_history as dh
    from simgan_dist.train.checkpoint import REFINER_FILE, STATE_FILE, load_data, set_rng_state
    from simgan_dist.train.engines import load_engines

    if not checkpoint:
        if rank == 0:
            dh.clear_shards(shards)
        return None, 0, None
    history_restored, position = 0, None
    with checkpoint.as_directory() as folder:
        load_engines(folder, *engines)
        if ema:
            ema.module.load_state_dict(load_data(os.path.join(folder, REFINER_FILE), f"checkpoint {REFINER_FILE}",
                                                 device))
        state = load_data(os.path.join(folder, STATE_FILE), f"checkpoint {STATE_FILE}")
        rank_rng = os.path.join(folder, f"rng_rank{rank}.pt")
        if os.path.exists(rank_rng):
            set_rng_state(load_data(rank_rng, f"checkpoint rng_rank{rank}.pt"))
        rank_position = os.path.join(folder, POSITION_FILE.format(rank))
        if os.path.exists(rank_position):
            position = load_data(rank_position, f"checkpoint {POSITION_FILE.format(rank)}")
            position = position if position["world"] == world else None
    if rank == 0:  # the shards read their files from storage themselves
        stored = storage.join(cfg.train.storage_path, cfg.train.name, os.path.basename(checkpoint.path))
        history_restored = dh.load_shards(shards, state["history"], stored, cfg.storage, env)
    return state["algorithm"], history_restored, position


def _write_checkpoint(cfg: Config, rank: int, engines: tuple, algo, shards: list, position: dict[str, Any],
                      scores: dict[str, Any] | None, stored: str, env: list | None) -> str:
    """This rank's part of a checkpoint (`position`: see `_restore`), in a local folder Ray uploads in the
    background to `stored` and then deletes; rank 0 has the history shards write their files straight
    to `stored`."""
    from simgan_dist.metrics.objective import write_scores
    from simgan_dist.train import distributed_history as dh
    from simgan_dist.train.checkpoint import rng_state, write_checkpoint
    from simgan_dist.train.engines import save_engines

    folder = tempfile.mkdtemp(prefix="simgan-ckpt-")
    save_engines(folder, *engines)
    torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))
    torch.save(position, os.path.join(folder, POSITION_FILE.format(rank)))
    if rank == 0:
        write_checkpoint(folder, cfg, refining(algo), engines[1].module, {
            "algorithm": algo.state_dict(), "history": dh.save_shards(shards, stored, cfg.storage, env),
        })
        if scores is not None:
            write_scores(folder, algo.global_step, scores)
    return folder


def _time_to_save(saved_at: float, every_s: float, device: torch.device) -> bool:
    """Rank 0's clock decides for everyone (ranks must agree on checkpointing); called at reports only."""
    import torch.distributed as dist

    due = torch.tensor([time.monotonic() - saved_at >= every_s], dtype=torch.uint8, device=device)
    dist.broadcast(due, src=0)
    return bool(to_host(due)[0])
