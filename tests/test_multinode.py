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
import json
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
    # A lost node is declared dead after 3 missed health checks 1 s apart (Ray's default: 5 x 3 s)
    detector = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": detector})
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


def command(cluster, *args: str, verbose: bool = False, script: str | None = None, **env_vars: str
            ) -> subprocess.Popen:
    """`simgan-dist ARGS` (or `python SCRIPT ARGS`, a `jobs/` entrypoint) joining the cluster as a
    user would (RAY_ADDRESS), output captured."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address, **env_vars}
    entry = [str(ROOT / script)] if script else ["-m", "simgan_dist.cli"]
    argv = [sys.executable, *entry, *args, *(["--verbose"] if verbose else [])]
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


def registered_checkpoints(bucket: str, run: str = f"runs/{NAME}") -> list[str]:
    """The checkpoints Ray Train has registered for the run under `run` (its checkpoint manager's
    snapshot names them): uploaded files alone are not yet a checkpoint a restarted worker group
    resumes from."""
    import boto3

    snapshot = f"{run}/checkpoint_manager_snapshot.json"
    if snapshot not in _keys(bucket, f"{run}/checkpoint_manager"):
        return []
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    body = client.get_object(Bucket=bucket.removeprefix("s3://"), Key=snapshot)["Body"].read().decode()
    return sorted(set(re.findall(r"checkpoint_[0-9_.:-]+", body)))


def saved_state(bucket: str, checkpoint: str, run: str = f"runs/{NAME}") -> tuple[int, int]:
    """(step, history images) of a checkpoint's state file."""
    import torch

    from simgan_dist.data import storage
    from simgan_dist.train.checkpoint import STATE_FILE
    from simgan_dist.train.distributed_history import history_images

    filesystem, path = storage.resolve(f"{bucket}/{run}/{checkpoint}/{STATE_FILE}")
    with filesystem.open_input_file(path) as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=False)
    return sum(state["algorithm"].values()), history_images(state["history"])


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the command did not finish in {timeout:g} s:\n{out[-6000:]}")
    return proc.returncode, out


def node_processes(cluster, marker: str) -> dict[int, list]:
    """The processes whose command line holds `marker` (Ray names an actor's process
    `ray::Class...`), by the worker node whose raylet started them (its index in cluster.workers)."""
    import psutil
    from ray._private import ray_constants

    raylets = {node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: i
               for i, node in enumerate(cluster.workers)}
    found: dict[int, list] = {}
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        if marker in " ".join(proc.info["cmdline"] or []) and proc.info["ppid"] in raylets:
            found.setdefault(raylets[proc.info["ppid"]], []).append(proc)
    return found


def lose_nodes(cluster, frozen: dict[int, list], lost: list[int], replacements: int) -> None:
    """Preempt the worker nodes `lost` (their processes in `frozen` die with them, as the node's
    would), wake the other frozen processes, and let `replacements` fresh nodes join."""
    import psutil

    for i in lost:
        cluster.remove_node(cluster.workers[i], allow_graceful=False)
        for proc in frozen.get(i, []):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    for i, procs in frozen.items():
        if i not in lost:
            for proc in procs:
                proc.resume()
    cluster.workers = [node for i, node in enumerate(cluster.workers) if i not in lost]
    cluster.workers += [cluster.add_node(num_cpus=1) for _ in range(replacements)]


def freeze(processes: dict[int, list]) -> dict[int, list]:
    """Suspend them (a kill then lands mid-job however fast the machine is)."""
    for procs in processes.values():
        for proc in procs:
            proc.suspend()
    return processes


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
    """A 2-worker run spread over two of three 1-CPU nodes (0.75 CPU a worker: Ray's PACK cannot put
    both on one node, and the third keeps the whole CPU Ray Data's tasks need); both workers' nodes
    preempted after the first checkpoint, two fresh ones join: the same run resumes from its
    latest checkpoint (train.max_failures), finishes every iteration, and its history buffer
    comes back as that checkpoint saved it."""
    bucket = corpora[0]
    cluster.workers.append(cluster.add_node(num_cpus=1))
    cluster.wait_for_nodes()
    proc = command(cluster, *train_args(corpora))
    wait_for(lambda: registered_checkpoints(bucket), proc, what="registered checkpoint")
    workers = node_processes(cluster, "ray::RayTrainWorker")
    assert [len(procs) for procs in workers.values()] == [1, 1], workers  # one worker on each of two nodes
    lose_nodes(cluster, {}, lost=sorted(workers), replacements=2)
    # what the checkpoints registered by the loss hold (keep_best removes them later)
    saved = dict(saved_state(bucket, c) for c in registered_checkpoints(bucket))
    rc, out = finish(proc)
    assert rc == 0, out[-6000:]
    assert "2 worker(s) x 0.75 CPU" in out, out
    resumed = re.search(r"\[mn\] resumed at step (\d+)/(\d+) with (\d+) history images", out)
    assert resumed, out
    step, total, images = map(int, resumed.groups())
    assert step > 0 and f"[{total}/{total} " in out, out  # resumed, then finished every step
    assert saved.get(step) == images > 0, (saved, resumed.group(0))
    assert "Traceback" not in out and "[state-dump]" not in out, out
    lost = [line for line in out.splitlines() if line.startswith("ray: ") and "marked dead" in line]
    assert len(lost) == 2, out  # one line per lost node
    cluster.remove_node(cluster.workers.pop())  # the two nodes the other tests expect


_MULTI_NODE_REFUSALS = r'''
import json, os, sys
import ray
from simgan_dist import refine as refine_module
from simgan_dist.config import load_config
from simgan_dist.errors import UserError

root, address = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
out = {}

def refused(name, call):
    try:
        call()
    except UserError as e:
        out[name] = str(e)
    else:
        out[name] = None

data = [f"data.synthetic={root}/synthetic", f"data.real={root}/real"]
from simgan_dist.train.driver import fit
refused("train", lambda: fit(load_config("tiny", overrides=[f"train.storage_path={root}/runs", *data])))
from simgan_dist.tune import sweep
refused("tune", lambda: sweep(load_config("tiny", overrides=[
    "train.eval_every=2", "tune.grace_steps=10", f"tune.output={root}/sweeps",
    "data.synthetic=s3://bucket/synthetic", "data.real=s3://bucket/real"])))
# refine reads the checkpoint and the input's manifest first (nothing written); stand in for that.
class Job:
    spec = {}
refine_module.plan_job = lambda *args: (Job(), False)
refused("refine", lambda: refine_module.refine(f"{root}/ckpt", "s3://bucket/synthetic", f"{root}/refined",
                                               load_config("tiny")))
out["written"] = sorted(os.listdir(root))
print("RESULT " + json.dumps(out))
ray.shutdown()
'''


@pytest.mark.slow
def test_local_paths_on_a_multi_node_cluster_are_refused_before_any_work(cluster, tmp_path):
    """Train, tune and refine given local paths on the cluster (head and two nodes) refuse at once,
    naming the keys and suggesting s3://, and write nothing. (The nodes share this machine's disk,
    so only our own up-front check can tell.) In a subprocess, like every command here."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _MULTI_NODE_REFUSALS, str(tmp_path), cluster.address],
                          capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["written"] == []
    for command, keys in {"train": ["train.storage_path", "data.synthetic", "data.real"],
                          "tune": ["tune.output"], "refine": ["refine --out"]}.items():
        message = out[command]
        assert message is not None, f"{command} was not refused"
        assert message.startswith(f"{command}: ") and "3 nodes" in message and "s3://" in message, message
        assert all(f"{key}=" in message for key in keys), message
    assert "data.synthetic" not in out["tune"] and "refine --input" not in out["refine"]  # s3:// there


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
    # Ray Train's wait per try to start the worker group (60 s by default), shorter for the test
    proc = command(cluster, *train_args(corpora, "train.max_failures=1"), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="6")
    wait_for(lambda: sum(map(len, node_processes(cluster, "ray::RayTrainWorker").values())) == 2, proc,
             what="training workers")
    started = time.monotonic()
    for node in cluster.workers:
        cluster.remove_node(node, allow_graceful=False)
    cluster.workers = []
    rc, out = finish(proc, timeout=300)
    assert rc == 1, out
    assert time.monotonic() - started < 90, out  # 2 tries of 6 s to start the group, plus the restarts
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out
    assert "could not be placed again" in errors[0] and "The same command continues it" in errors[0], out
    assert "Traceback" not in out and "[state-dump]" not in out, out


def _checkpoint_on_s3(bucket: str, tmp_path: Path) -> str:
    """An untrained tiny refiner's checkpoint (refine only needs its weights), uploaded to the bucket."""
    from simgan_dist.config import load_config
    from simgan_dist.core.models import build_discriminator, build_refiner
    from simgan_dist.data import storage
    from simgan_dist.train.checkpoint import write_checkpoint

    cfg = load_config("tiny")
    folder = write_checkpoint(tmp_path / "checkpoint", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    for path in sorted(folder.iterdir(), key=lambda p: p.name == "config.yaml"):  # config.yaml last: complete
        storage.write_bytes_atomic(f"{bucket}/checkpoint/{path.name}", path.read_bytes())
    return f"{bucket}/checkpoint"


@pytest.mark.slow
def test_refine_with_a_node_lost_mid_job_is_exact(cluster, corpora, tmp_path):
    """Two refine actors, one per worker node; one node preempted while both have shard tasks in
    flight, a fresh one joins: Ray restarts the actor there and resends its tasks, and the
    output is exact (every id once, in input order, labels bit-identical)."""
    from simgan_dist.data import storage
    from simgan_dist.data.schema import load_numpy, read_manifest

    bucket, synthetic, _ = corpora
    out = f"{bucket}/refined"
    proc = command(cluster, "refine", "--preset", "tiny", "--checkpoint", _checkpoint_on_s3(bucket, tmp_path),
                   "--input", synthetic, "--out", out, "--set", "refine.rows_per_shard=2",
                   "--set", "refine.min_actors=2", "--set", "refine.max_actors=2")

    def first_shard():  # frozen as soon as one is seen: 128 small tasks take the actors a few seconds
        if [n for n in storage.list_files(out) if n.startswith("part-")]:
            return freeze(node_processes(cluster, "RefinerActor"))
        return None

    actors = wait_for(first_shard, proc, what="refined shard")
    assert sorted(actors) == [0, 1], actors  # an actor on each node
    lose_nodes(cluster, actors, lost=[0], replacements=1)
    rc, printed = finish(proc)
    assert rc == 0, printed[-6000:]
    assert re.search(r"^refine: 256 of 256 rows refined .*ids and labels verified exact$", printed, re.M), printed
    source, refined = load_numpy(synthetic), load_numpy(out)  # every shard's sha256 checked
    assert read_manifest(out).rows == len(refined["id"]) == 256
    assert list(refined["id"]) == list(source["id"]) and len(set(refined["id"])) == 256
    for name in ("gaze", "pupil_xy", "head_pose"):
        assert refined[name].tobytes() == source[name].tobytes(), name
    assert "Traceback" not in printed and "[state-dump]" not in printed, printed
    # one line for the lost node, if Ray declared it dead before the job ended
    lost = [line for line in printed.splitlines() if line.startswith("ray: ") and "marked dead" in line]
    assert len(lost) <= 1, printed


# What `ray job submit ... jobs/tune.py` runs (README, "Try the cluster path on one machine"), here
# joining the multi-node cluster: two trials of 12 steps, one at a time.
TUNE_SMOKE = ("jobs/tune.py", "--config", "jobs/configs/tune-smoke.yaml")


@pytest.mark.slow
def test_a_sweep_whose_nodes_are_lost_resumes_the_trial_from_its_checkpoint(cluster, corpora):
    """The first trial's nodes preempted (its own process, worker, history shards and progress
    channel with them) after its first checkpoint, two fresh ones join: Tune restarts the trial
    (tune.trial_failure_config), which continues its run from that checkpoint with its history
    buffer; both trials finish and the sweep names its winner."""
    bucket, synthetic, real = corpora
    sweep = "sweeps/tune-smoke"
    # longer trials (24 steps, a checkpoint every 6) than the smoke config's, so the loss lands mid-trial
    proc = command(cluster, *TUNE_SMOKE[1:], "--set", f"data.synthetic={synthetic}", "--set", f"data.real={real}",
                   "--set", f"tune.output={bucket}/sweeps", "--set", "train.iterations=18",
                   "--set", "train.eval_every=6", "--set", "tune.grace_steps=24", script=TUNE_SMOKE[0])

    def first_trial_checkpoint():
        runs = {key.split("/")[3] for key in _keys(bucket, f"{sweep}/runs/") if key.count("/") >= 4}
        for run in runs:
            if registered_checkpoints(bucket, f"{sweep}/runs/{run}"):
                return run, freeze(node_processes(cluster, "ray::RayTrainWorker"))
        return None

    run, frozen = wait_for(first_trial_checkpoint, proc, what="trial checkpoint")
    lose_nodes(cluster, frozen, lost=[0, 1], replacements=2)
    # what the checkpoints registered by the loss hold (one more may have come before the freeze)
    saved = dict(saved_state(bucket, c, f"{sweep}/runs/{run}") for c in registered_checkpoints(
        bucket, f"{sweep}/runs/{run}"))
    rc, printed = finish(proc, timeout=400)
    assert rc == 0, printed[-6000:]
    trial = run.removeprefix("tune-smoke-")
    assert re.search(rf"^tune: trial {trial} \(.*\) failed \(.*\); restarting it from its latest checkpoint "
                     r"\(restart 1 of 2\)$", printed, re.M), printed
    resumed = re.search(rf"^tune: trial {trial} resumed at step (\d+) with (\d+) history images$", printed, re.M)
    assert resumed, printed
    step, images = map(int, resumed.groups())
    assert saved.get(step) == images > 0, (saved, resumed.group(0))
    ended = re.findall(r"^tune: trial \w+ \(k_g=\d+, lr=[\d.e-]+, λ=[\d.e-]+\) ended at step 24$", printed, re.M)
    assert len(ended) == 2, printed
    # each trial's worker leaves a CPU for Ray Data, and 2 x 0.25 for its history shards, beside the trial's 0.01
    assert "tune: each trial 1 worker(s) x 0.49 CPU (+1 CPU for Ray Data, 0.5 CPU for 2 history shard(s))" in printed
    assert "View detailed results here" not in printed, printed
    assert f"{sweep}/results.csv" in _keys(bucket, sweep) and f"{sweep}/best_checkpoint.txt" in _keys(bucket, sweep)
    assert "Traceback" not in printed and "[state-dump]" not in printed and "Trial status:" not in printed, printed
    lost = [line for line in printed.splitlines() if line.startswith("ray: ") and "marked dead" in line]
    assert len(lost) == 2, printed
