"""The multi-node tier: a real Ray cluster on one machine (DESIGN.md §3a), nodes lost mid-run.

`ray.cluster_utils.Cluster` with a 0-CPU head (like our KubeRay manifests) and 1-CPU worker nodes,
each its own raylet; `cluster.remove_node(node, allow_graceful=False)` is a spot preemption. The
commands run as a user runs them: `simgan-dist ...` in a subprocess joining through RAY_ADDRESS,
with the loopback S3 endpoint as storage (local paths are refused on a multi-node cluster).

The cluster's processes are started from this process without connecting to it (no `ray.init`
here: the session's `ray_local` instance may be up in this process).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME = "mn"


@pytest.fixture(scope="module")
def module_cluster(s3_server):
    """A 0-CPU head, shared by the module's tests (each start costs ~10 s)."""
    from ray.cluster_utils import Cluster

    saved = os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.workers = []
    try:
        yield cluster
    finally:
        cluster.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture
def cluster(module_cluster):
    """The head plus two live 1-CPU worker nodes; `cluster.workers` lists the worker nodes."""
    module_cluster.workers += [module_cluster.add_node(num_cpus=1) for _ in range(2 - len(module_cluster.workers))]
    module_cluster.wait_for_nodes()
    return module_cluster


@pytest.fixture
def corpora(s3_bucket):
    """Tiny eye corpora in the bucket (rendered in this process, no Ray): (bucket, synthetic, real)."""
    from simgan_dist.data.simulate import simulate_dataset

    simulate_dataset(f"{s3_bucket}/data", 256, 256, 0, parallel=False)
    return s3_bucket, f"{s3_bucket}/data/synthetic", f"{s3_bucket}/data/real"


def command(cluster, *args: str, verbose: bool = False, **env_vars: str) -> subprocess.Popen:
    """`simgan-dist ARGS` joining the cluster as a user would (RAY_ADDRESS), output captured."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address, **env_vars}
    argv = [sys.executable, "-m", "simgan_dist.cli", *args, *(["--verbose"] if verbose else [])]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def train_args(corpora, *overrides: str) -> list[str]:
    bucket, synthetic, real = corpora
    return ["train", "--preset", "tiny", "--set", f"train.name={NAME}", "--set", f"train.storage_path={bucket}/runs",
            "--set", f"data.synthetic={synthetic}", "--set", f"data.real={real}",
            "--set", "train.num_workers=2", "--set", "train.max_failures=3",
            "--set", "train.pretrain_refiner_steps=4", "--set", "train.pretrain_disc_steps=2",
            "--set", "train.iterations=24", "--set", "train.checkpoint_every=6", "--set", "train.report_every=6",
            "--set", "train.image_every=1000",
            *[item for o in overrides for item in ("--set", o)]]


def _keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket.removeprefix("s3://"), Prefix=prefix) for o in page.get("Contents", [])]


def registered_checkpoints(bucket: str) -> list[str]:
    """The run's checkpoints Ray Train has registered (its checkpoint manager's snapshot names them):
    uploaded files alone are not yet a checkpoint a restarted worker group resumes from."""
    import boto3

    if f"runs/{NAME}/checkpoint_manager_snapshot.json" not in _keys(bucket, f"runs/{NAME}/checkpoint_manager"):
        return []
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    body = client.get_object(Bucket=bucket.removeprefix("s3://"),
                             Key=f"runs/{NAME}/checkpoint_manager_snapshot.json")["Body"].read().decode()
    return sorted(set(re.findall(r"checkpoint_[0-9_.:-]+", body)))


def saved_state(bucket: str, checkpoint: str) -> tuple[int, int]:
    """(step, history images) of a checkpoint's state file."""
    import torch

    from simgan_dist.data import storage
    from simgan_dist.train.checkpoint import STATE_FILE

    filesystem, path = storage.resolve(f"{bucket}/runs/{NAME}/{checkpoint}/{STATE_FILE}")
    with filesystem.open_input_file(path) as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=False)
    return sum(state["algorithm"].values()), sum(len(shard["images"]) for shard in state["history"])


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the command did not finish in {timeout:g} s:\n{out[-6000:]}")
    return proc.returncode, out


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}:\n{proc.stdout.read()[-6000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no {what} in {timeout:g} s:\n{proc.communicate()[0][-6000:]}")


@pytest.mark.slow
def test_the_whole_worker_pool_lost_and_replaced_resumes_by_itself(cluster, corpora):
    """Both worker nodes preempted after the first checkpoint, two fresh ones join: the same run
    resumes from its latest checkpoint (train.max_failures), finishes every iteration, and its
    history buffer comes back as that checkpoint saved it."""
    bucket = corpora[0]
    proc = command(cluster, *train_args(corpora))
    registered = wait_for(lambda: registered_checkpoints(bucket), proc, what="registered checkpoint")
    for node in cluster.workers:
        cluster.remove_node(node, allow_graceful=False)
    # what the checkpoints registered by then hold (keep_best removes them later)
    saved = dict(saved_state(bucket, c) for c in registered)
    cluster.workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    rc, out = finish(proc)
    assert rc == 0, out[-6000:]
    resumed = re.search(r"\[mn\] resumed at step (\d+)/(\d+) with (\d+) history images", out)
    assert resumed, out
    step, total, images = map(int, resumed.groups())
    assert step > 0 and f"[{total}/{total} " in out, out  # resumed, then finished every step
    assert saved.get(step) == images > 0, (saved, resumed.group(0))
    assert "Traceback" not in out and "[state-dump]" not in out, out
    lost = [line for line in out.splitlines() if line.startswith("ray: ") and "marked dead" in line]
    assert len(lost) == 2, out  # one line per lost node


def test_a_lost_node_is_one_console_line():
    """What Ray publishes to the driver when a node goes (raylet terminated, node marked dead) prints
    as one line each without --verbose: no `[state-dump]` tail, no start-up warnings."""
    from simgan_dist.ray_cluster import cluster_event_line

    terminated = ("Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL by the "
                  "user or system OOM killer, (2) Invalid memory access. Last 20 lines of the Raylet logs:\n"
                  "    [state-dump] NodeManager: 1 total\n    [state-dump] DebugString() time ms: 0\n")
    assert cluster_event_line(terminated) is None  # names no node; the "marked dead" line that follows does
    dead = ("The node with node id: 104f and address: 192.0.2.2 and node name: 192.0.2.2 has been marked dead "
            "because the detector has missed too many heartbeats from it. This can happen when a \t(1) raylet "
            "crashes unexpectedly (OOM, \n\t(2) raylet has lagging heartbeats")
    assert cluster_event_line(dead) == ("ray: The node with node id: 104f and address: 192.0.2.2 and node name: "
                                        "192.0.2.2 has been marked dead because the detector has missed too many "
                                        "heartbeats from it.")
    assert cluster_event_line("WARNING: 4 PYTHON worker processes have been started on node: cb9 with ...") is None


@pytest.mark.slow
def test_the_whole_worker_pool_lost_with_no_replacement_fails_in_one_line(cluster, corpora):
    """Both worker nodes preempted and none join: the run fails after a bounded wait, with one line
    that says what was lost and that the same command continues it; no traceback without --verbose."""
    bucket = corpora[0]
    # Ray Train's wait per try to start the worker group (60 s by default), shorter for the test
    proc = command(cluster, *train_args(corpora, "train.max_failures=1"), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="12")
    wait_for(lambda: registered_checkpoints(bucket), proc, what="registered checkpoint")
    started = time.monotonic()
    for node in cluster.workers:
        cluster.remove_node(node, allow_graceful=False)
    cluster.workers = []
    rc, out = finish(proc, timeout=300)
    assert rc == 1, out
    assert time.monotonic() - started < 120, out  # 2 tries of 12 s to start the group, plus the restarts
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out
    assert "could not be placed again" in errors[0] and "The same command continues it" in errors[0], out
    assert "Traceback" not in out and "[state-dump]" not in out, out
