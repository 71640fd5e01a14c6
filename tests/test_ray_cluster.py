"""Joining or starting Ray, and planning a training run's resources (simgan_dist.ray_cluster)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from simgan_dist.config import load_config
from simgan_dist.errors import UserError
from simgan_dist.train.distributed_history import SHARD_CPUS
from simgan_dist.train.resources import DATA_CPUS, history_cpus, plan_workers


def _cfg(*overrides):
    return load_config("tiny", overrides=list(overrides))


def test_cpu_workers_leave_a_cpu_for_ray_data_and_their_history_shards_cpus():
    # the tiny preset: 2 history shards of SHARD_CPUS each
    assert history_cpus(_cfg()) == 2 * SHARD_CPUS
    assert plan_workers(_cfg("train.num_workers=2", "train.buffer_shards=1"), {"CPU": 2.5}) == {"CPU": 0.625}
    assert plan_workers(_cfg("train.num_workers=2"), {"CPU": 2}) == {"CPU": 0.25}
    assert plan_workers(_cfg("train.num_workers=2"), {"CPU": 16}) == {"CPU": 1.0}
    plan = plan_workers(_cfg("train.num_workers=3"), {"CPU": 3})
    assert 3 * plan["CPU"] + DATA_CPUS + history_cpus(_cfg()) <= 3
    # the eye preset's 4 shards on a laptop: everything fits, or the run says what to change
    eye = load_config("eye", overrides=["train.use_gpu=false"])
    plan = plan_workers(eye, {"CPU": 4})
    assert plan["CPU"] + DATA_CPUS + history_cpus(eye) <= 4
    with pytest.raises(UserError, match=r"train.buffer_shards=4 needs at least 2.25 CPUs .* it has 2\. "
                                        r"Set train.buffer_shards=3 or fewer"):
        plan_workers(eye, {"CPU": 2})


def test_gpu_workers_need_a_gpu_each():
    assert plan_workers(_cfg("train.num_workers=2", "train.use_gpu=true"), {"CPU": 16, "GPU": 2}) == {
        "CPU": 1.0, "GPU": 1.0}
    with pytest.raises(UserError, match=r"needs 4 GPUs; the Ray cluster has 2\. Set train.num_workers=2"):
        plan_workers(_cfg("train.num_workers=4", "train.use_gpu=true"), {"CPU": 64, "GPU": 2})
    with pytest.raises(UserError, match="has no GPUs: set train.use_gpu=false"):
        plan_workers(_cfg("train.use_gpu=true"), {"CPU": 8})


def test_a_run_that_cannot_fit_says_what_to_change():
    with pytest.raises(UserError, match=r"num_workers=4 needs at least 3 CPUs .* it has 2\. Set train.num_workers=2"):
        plan_workers(_cfg("train.num_workers=4"), {"CPU": 2})
    with pytest.raises(UserError, match="Add CPUs"):
        plan_workers(_cfg("train.num_workers=1"), {"CPU": 1})


def test_concurrent_runs_share_the_cluster_and_their_drivers_sliver_is_taken_from_the_workers():
    # a sweep's trial on a 3-CPU head: its own 0.01 CPU, 2 workers, Ray Data's CPU, 2 history shards;
    # never more than 3
    plan = plan_workers(_cfg("train.num_workers=2"), {"CPU": 3}, reserved_cpus=0.01)
    assert plan == {"CPU": 0.745} and 0.01 + 2 * plan["CPU"] + DATA_CPUS + history_cpus(_cfg()) <= 3
    with pytest.raises(UserError, match=r"needs at least 2.01 CPUs .* 0.01 for the run's driver\); it has 2\. "
                                        r"Set train.buffer_shards=1 or fewer"):
        plan_workers(_cfg("train.num_workers=2"), {"CPU": 2}, reserved_cpus=0.01)
    assert plan_workers(_cfg("train.num_workers=1"), {"CPU": 8}, runs=4, reserved_cpus=0.01) == {"CPU": 0.49}
    assert plan_workers(_cfg("train.num_workers=1"), {"CPU": 10}, runs=4, reserved_cpus=0.01) == {"CPU": 0.99}
    with pytest.raises(UserError, match=r"on each of 3 concurrent runs' share of the Ray cluster .* it has 1\.33"):
        plan_workers(_cfg("train.num_workers=2"), {"CPU": 4}, runs=3)
    with pytest.raises(UserError, match=r"needs 2 GPUs; each of 2 concurrent runs' share of the Ray cluster has 1\."):
        plan_workers(_cfg("train.num_workers=2", "train.use_gpu=true"), {"CPU": 32, "GPU": 2}, runs=2)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cli(tmp_path, *args, **env):
    """`simgan-dist train` in a subprocess whose Ray temp dir is `tmp_path` (nothing else joins)."""
    return subprocess.run(
        [sys.executable, "-m", "simgan_dist.cli", "train", "--preset", "tiny", *args],
        env={**os.environ, "TMPDIR": str(tmp_path), **env}, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("where", ["address file", "RAY_ADDRESS"])
@pytest.mark.slow
def test_an_address_nothing_answers_at_is_a_clear_error(tmp_path, where):
    address = f"127.0.0.1:{_closed_port()}"
    if where == "address file":
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address)
        env = {}
    else:
        env = {"RAY_ADDRESS": address}
    run = _train_cli(tmp_path, **env)
    assert run.returncode == 1, run.stderr
    assert f"no Ray cluster answers at {address}" in run.stderr
    assert ("ray stop" if where == "address file" else "unset it") in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_a_run_too_big_for_the_cluster_fails_at_once():
    """A local instance on this machine's CPUs: 2 + CPUs workers cannot fit beside Ray Data."""
    workers = 2 + (os.cpu_count() or 1)
    # Short: Ray's unix sockets live under it and their paths may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="raylocal-", dir="/tmp")
    try:
        run = _train_cli(temp_dir, "--set", f"train.num_workers={workers}")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert run.returncode == 1, run.stderr
    assert "started a local Ray instance" in run.stdout
    assert f"train.num_workers={workers} needs at least" in run.stderr and "Set train.num_workers=" in run.stderr


@pytest.mark.slow
def test_placement_groups_of_dead_actors_are_removed_and_no_others(ray_local):
    """What a trial killed with its Train controller leaves: a group whose creator actor died."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from simgan_dist.ray_cluster import remove_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def reserve(self) -> str:
            group = placement_group([{"CPU": 0.25}, {"CPU": 0.125}])
            ray.get(group.ready())
            return group.id.hex()

    def state(group_id: str) -> str:
        return ray.util.placement_group_table()[group_id]["state"]

    by_driver = placement_group([{"CPU": 0.25}])
    ray.get(by_driver.ready())
    doomed, living = Creator.remote(), Creator.remote()
    orphan, kept = ray.get(doomed.reserve.remote()), ray.get(living.reserve.remote())
    ray.kill(doomed)
    deadline = time.monotonic() + 30
    freed = []
    while not freed and time.monotonic() < deadline:  # the GCS learns of the death asynchronously
        freed = remove_orphaned_placement_groups()
        time.sleep(0.2)
    assert freed == [{"CPU": 0.375}]
    deadline = time.monotonic() + 10
    while state(orphan) != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state(orphan) == "REMOVED"
    assert state(kept) == "CREATED" and state(by_driver.id.hex()) == "CREATED"
    ray.kill(living)
    remove_placement_group(by_driver)
