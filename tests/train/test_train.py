"""Ray Train + DeepSpeed training against real components: a local Ray cluster, DeepSpeed engines
over gloo, the loopback S3 endpoint, and simulated data in the Parquet contract."""

import json
import threading
import time
from pathlib import Path

import pytest

from simgan_dist.config import load_config
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.train.checkpoint import load_refiner
from simgan_dist.train.driver import checkpoint_uri, fit, history_run_id
from simgan_dist.train.local import train_local
from simgan_dist.train.worker import CHUNK_BATCHES, ShardStream


@pytest.fixture(scope="module")
def eye_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eyes")
    simulate_dataset(str(folder), synthetic=512, real=256, real_test=0, seed=3, rows_per_shard=200)
    return folder


SCHEDULE = ["train.pretrain_refiner_steps=4", "train.pretrain_disc_steps=4", "train.report_every=5",
            "train.image_every=10"]


def _config(*overrides):
    return load_config("tiny", overrides=[*SCHEDULE, *overrides])


class _Shard:
    """A Ray Data shard's iteration interface over rows whose first pixel is their index."""

    def __init__(self, rows: int):
        import torch

        self.images = torch.arange(rows).view(-1, 1, 1, 1).to(torch.uint8)
        self.fetches: list[int] = []

    def iter_torch_batches(self, batch_size: int, prefetch_batches: int):
        for start in range(0, len(self.images), batch_size):
            self.fetches.append(batch_size)
            yield {"image": self.images[start:start + batch_size]}


def _epoch_rows(stream: ShardStream, batches: int) -> list[list[int]]:
    return [stream()[:, 0, 0, 0].tolist() for _ in range(batches)]


def test_shard_stream_serves_chunks_batch_by_batch():
    shard = _Shard(100)
    stream = ShardStream(shard, 8, to_input=lambda images: images.long(), shuffle=False)
    first, second = _epoch_rows(stream, 12), _epoch_rows(stream, 12)
    # consecutive rows, the epoch's last partial batch (4 rows) dropped, as the local trainer does
    assert first == second == [list(range(i, i + 8)) for i in range(0, 96, 8)]
    assert set(shard.fetches) == {CHUNK_BATCHES * 8}  # one Ray Data fetch per CHUNK_BATCHES batches
    shuffled = ShardStream(_Shard(100), 8, to_input=lambda images: images.long(), shuffle=True)
    for _ in range(2):
        rows = [row for batch in _epoch_rows(shuffled, 12) for row in batch]
        assert len(set(rows)) == 96 and rows != sorted(rows)  # each epoch: distinct rows, not in stored order
    with pytest.raises(RuntimeError, match="fewer rows than one batch"):
        ShardStream(_Shard(5), 8, to_input=lambda images: images, shuffle=False)()


def test_shard_stream_starts_the_next_epoch_ahead_and_hands_on_read_errors():
    shard = _Shard(100)  # an epoch is 2 chunks of 64 and 36 rows
    stream = ShardStream(shard, 8, to_input=lambda images: images, shuffle=False)
    stream()
    deadline = time.monotonic() + 10
    while len(shard.fetches) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(shard.fetches) == 3, "the next epoch was not started while this one still had 11 batches"
    stream.close()

    class _Unreadable(_Shard):
        def iter_torch_batches(self, batch_size: int, prefetch_batches: int):
            yield {"image": self.images[:batch_size]}
            raise OSError("s3://bucket/real/part-3.parquet: connection reset")

    broken = ShardStream(_Unreadable(100), 8, to_input=lambda images: images, shuffle=False)
    assert len(_epoch_rows(broken, 8)) == 8  # the first chunk is served
    with pytest.raises(OSError, match="part-3.parquet: connection reset"):
        broken()


def test_shard_stream_resumed_from_its_state_serves_what_the_saved_one_would():
    """Mid-epoch (3 chunks of 64 rows an epoch, the second chunk partly served), shuffled: a new stream
    over the same shard, given the saved state and the same RNG state, serves the same batches on,
    across the epoch's end; a fresh one starts the epoch over."""
    import torch

    def stream():
        return ShardStream(_Shard(200), 8, to_input=lambda images: images, shuffle=True)

    torch.manual_seed(0)
    saved = stream()
    _epoch_rows(saved, 11)
    state, rng = saved.state_dict(), torch.get_rng_state()
    assert state["taken"] == 2 and len(state["rows"]) == 2 * 64 - 11 * 8
    expected = _epoch_rows(saved, 20)  # the epoch's 14 batches left, then the next's first 6
    resumed = stream()
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    assert _epoch_rows(resumed, 20) == expected
    torch.set_rng_state(rng)
    assert _epoch_rows(stream(), 20) != expected


def _checkpoint_files_are_data(run_uri: str) -> list[str]:
    """Every .pt object under `run_uri` but DeepSpeed's, each loaded by plain torch.load(weights_only=True)."""
    import io

    import pyarrow.fs as pafs
    import torch

    from simgan_dist.data import storage

    filesystem, path = storage.resolve(run_uri)
    found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    names = [info.path.removeprefix(f"{path}/") for info in found if info.path.endswith(".pt")]
    names = [name for name in names if "deepspeed" not in name.split("/")]
    for name in names:
        torch.load(io.BytesIO(storage.read_bytes(f"{run_uri}/{name}")), weights_only=True)
    return names


@pytest.mark.slow
def test_two_workers_end_to_end_on_s3_then_resubmitted(ray_local, s3_server, s3_bucket, mlflow_server, tmp_path,
                                                       capsys):
    """Two ZeRO-2 workers read their corpora from S3 and keep their run there, with EMA of R and
    best-K checkpoints by the label-free objective, fake credentials in the config: the metrics,
    the checkpoints (every file but DeepSpeed's is data), the monitor; the same job submitted
    again with a longer schedule continues the run (EMA from refiner.pt), and its MLflow run (one,
    logged by rank 0 only); refine's choice of the best checkpoint refuses a payload planted there;
    no object, log, console line or MLflow record holds the credentials (the config's secrets reach
    the workers through the object store)."""
    import ray
    from leak_check import FAKE, every_output, leaked
    from mlflow import MlflowClient
    from test_checkpoint_safety import plant

    from simgan_dist.data import storage
    from simgan_dist.refine import choose_checkpoint
    from simgan_dist.train.checkpoint import CheckpointError

    data = f"{s3_bucket}/eyes"
    simulate_dataset(data, synthetic=384, real=192, real_test=0, seed=1, rows_per_shard=100)
    # train.deterministic off, as a production run has it (the tiny preset turns it on)
    overrides = ["train.num_workers=2", "train.checkpoint_every=7", "train.zero_stage=2", "train.buffer_size=128",
                 "train.deterministic=false",
                 f"data.synthetic={data}/synthetic", f"data.real={data}/real", "data.real_val_fraction=0.2",
                 "train.ema_decay=0.9", "train.eval_every=7", "train.eval_samples=32", "train.keep_best=2",
                 f"train.storage_path={s3_bucket}/runs", "train.name=e2e",
                 f"tracking.mlflow_uri={mlflow_server.uri}", f"tracking.experiment=e2e-{s3_bucket[5:]}",
                 *[f"storage.{key}={secret}" for key, secret in FAKE.items()]]
    cfg = _config(*overrides, "train.iterations=6")
    result = fit(cfg)
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 14 and metrics["phase"] == "adversarial"
    for key in ("refiner/adv_loss", "refiner/reg_loss", "disc/loss", "disc/acc_real", "disc/acc_refined",
                "images_per_s", "data_wait_s", "buffer_fill", "objective"):
        assert key in metrics, key
    assert metrics["buffer_fill"] == 1.0  # 2 workers x 16 images x 10 D steps > 2 x 128 slots
    uri = checkpoint_uri(cfg, result.checkpoint)
    assert uri.startswith(f"{s3_bucket}/runs/e2e/checkpoint_")
    refiner, saved = load_refiner(uri, cfg.storage)
    assert saved.train.name == "e2e"
    monitor = storage.list_files(f"{s3_bucket}/runs/e2e/monitor")
    assert "metrics.jsonl" in monitor
    assert storage.list_files(f"{s3_bucket}/runs/e2e/monitor/images")
    loaded = _checkpoint_files_are_data(f"{s3_bucket}/runs/e2e")
    for name in ("state.pt", "rng_rank1.pt", "position_rank1.pt"):
        assert any(n.endswith(f"/{name}") for n in loaded), (name, loaded)

    # the same job submitted again with a longer schedule continues the run
    again = fit(_config(*overrides, "train.iterations=8"))
    assert again.error is None
    assert again.metrics["restored_from_step"] == 14 and again.metrics["step"] == 16
    assert again.metrics["history_restored"] == 256
    # metrics.jsonl on S3 kept the first attempt's lines and the resubmitted run appended to them
    lines = storage.read_bytes(f"{s3_bucket}/runs/e2e/monitor/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 7, 10, 14, 15, 16]
    _checkpoint_files_are_data(f"{s3_bucket}/runs/e2e")
    # one MLflow run, continued by the resubmission, each report once (rank 0 alone logs)
    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name(f"e2e-{s3_bucket[5:]}").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "disc/loss")] == [5, 7, 10, 14, 15, 16]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "objective")] == [7, 14, 16]
    assert run.data.tags["simgan.checkpoint"] == checkpoint_uri(cfg, again.checkpoint)
    assert client.list_artifacts(run.info.run_id, "images")

    best = choose_checkpoint(f"{s3_bucket}/runs/e2e", cfg)
    load_refiner(best, cfg.storage)
    marker = tmp_path / "pwned"
    plant(tmp_path / "refiner.pt", marker)
    storage.write_bytes_atomic(f"{best}/refiner.pt", (tmp_path / "refiner.pt").read_bytes(), cfg.storage)
    with pytest.raises(CheckpointError, match=r"refiner.pt: refusing to load"):
        load_refiner(choose_checkpoint(f"{s3_bucket}/runs/e2e", cfg), cfg.storage)
    assert not marker.exists()

    session_logs = ray._private.worker._global_node.get_session_dir_path()
    assert not leaked(every_output(s3_server, s3_bucket.removeprefix("s3://"), session_logs, mlflow_server.db.parent))
    printed = capsys.readouterr()
    assert not any(secret in printed.out + printed.err for secret in FAKE.values())


def _fit_acting_once(cfg, act, within_s: float = 300):
    """fit(cfg) while a thread polls `act()` until it returns a value (it acted) or time runs out;
    returns the result and [that value], or [] when it never acted."""
    acted = []

    def poll():
        deadline = time.time() + within_s
        while time.time() < deadline and not acted:
            if (value := act()) is not None:
                acted.append(value)
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    result = fit(cfg)
    watcher.join(timeout=5)
    return result, acted


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_killed_history_shard_comes_back_empty_and_training_goes_on(ray_local, eye_data, tmp_path, capsys,
                                                                    monkeypatch):
    """Also: relative data paths, as a user types them, with an evaluation (rank 0's evaluator reads
    data.synthetic from the worker's own folder: it failed there with `no dataset here`)."""
    import ray

    from simgan_dist.train import distributed_history as dh

    monkeypatch.chdir(eye_data)
    cfg = _config("train.iterations=30", "train.report_every=2", "train.checkpoint_every=100", "train.buffer_size=128",
                  "data.synthetic=synthetic", "data.real=real", "train.eval_every=38", "train.eval_samples=32",
                  "data.real_val_fraction=0.1",
                  f"train.storage_path={tmp_path}", "train.name=shard", "train.max_failures=0")
    metrics = tmp_path / "shard" / "monitor" / "metrics.jsonl"

    def kill_a_shard_once_the_buffer_is_full():
        if not (metrics.exists() and any(r.get("buffer_fill") == 1.0 for r in _jsonl(metrics))):
            return None
        shard = dh.get_shards(history_run_id(cfg), cfg.train.buffer_shards)[0]
        ray.kill(shard, no_restart=False)  # as if its node died: Ray restarts it from its constructor
        return _jsonl(metrics)[-1]["step"]

    result, killed = _fit_acting_once(cfg, kill_a_shard_once_the_buffer_is_full)
    assert killed, "the buffer never filled, or no shard was found to kill"
    assert result.error is None
    # the run went on, with no worker-group restart, and said what happened
    assert result.metrics["step"] == 38 and result.metrics["restored_from_step"] == 0
    assert result.metrics["history_restarts"] == 1 and result.metrics["objective"] > 0
    assert "warning: history shard(s) [0] lost their actor and came back empty" in capsys.readouterr().out
    fills = [r["buffer_fill"] for r in _jsonl(metrics) if r["step"] > killed[0]]
    assert min(fills) < 1.0 and fills[-1] == 1.0  # half the buffer was lost, then refilled


@pytest.mark.slow
def test_single_worker_follows_the_local_trainer(ray_local, eye_data, tmp_path):
    import torch

    overrides = ["train.iterations=8", "train.checkpoint_every=100", "train.shuffle=false",
                 "train.buffer_shards=1", f"data.synthetic={eye_data}/synthetic", f"data.real={eye_data}/real",
                 f"train.storage_path={tmp_path}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray worker: the same reduction order in every conv
    try:
        train_local(_config(*overrides, "train.name=local"), tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    # checkpoints by time too: due at every report here (they must not change the trajectory)
    result = fit(_config(*overrides, "train.name=ray", "train.num_workers=1", "train.checkpoint_every_s=0.001"))
    assert result.error is None
    assert [m["step"] for _, m in result.best_checkpoints] == [10, 15, 16]
    local = _jsonl(tmp_path / "local" / "metrics.jsonl")
    ray_path = _jsonl(tmp_path / "ray" / "monitor" / "metrics.jsonl")
    assert [r["step"] for r in local] == [r["step"] for r in ray_path] == [5, 10, 15, 16]
    # Same seeds, same data order, same buffer draws: the trajectories agree to 1e-4 relative.
    for a, b in zip(local, ray_path, strict=False):
        for key in ("refiner/reg_loss", "refiner/adv_loss", "disc/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


@pytest.mark.slow
def test_console_lines_never_wait_on_the_driver_and_none_is_lost(ray_local, capsys):
    """Rank 0's progress lines go to the driver's queue actor without a round trip each (a slow
    actor does not slow the training thread); once that actor is gone (its node lost), the lines
    go to the worker's stdout instead, the failed one included."""
    import ray

    from simgan_dist.train.worker import ConsoleChannel

    @ray.remote(num_cpus=0)
    class SlowQueue:
        def __init__(self):
            self.lines = []

        def put_nowait(self, line):
            time.sleep(0.3)
            self.lines.append(line)

        def received(self):
            return self.lines

    class Queue:  # what the channel uses of ray.util.queue.Queue
        actor = SlowQueue.remote()

    ray.get(Queue.actor.received.remote())  # started
    channel = ConsoleChannel(Queue)
    started = time.perf_counter()
    for i in range(5):
        channel.say(f"line {i}")
    assert time.perf_counter() - started < 0.3  # 5 x 0.3 s if each line waited for its reply
    channel.close()
    assert ray.get(Queue.actor.received.remote()) == [f"line {i}" for i in range(5)]
    assert capsys.readouterr().out == ""

    ray.kill(Queue.actor)
    channel.say("after the node was lost")
    channel.say("and later")
    channel.close()
    assert capsys.readouterr().out == "after the node was lost\nand later\n"
