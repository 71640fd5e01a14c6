"""`ray job submit` against a real head node with token authentication, using the README's commands.

One head node for the module (`ray start --head --num-cpus 2`, free ports, its own TMPDIR so no
other Ray process on the machine joins it). Training runs with 2 workers on those 2 CPUs: the
data path must fit beside them. Its first submission is stopped mid-run and the same command
submitted again resumes it. Every submission after training is one entry in JOBS.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from simgan_dist.data.schema import read_manifest

REPO = Path(__file__).resolve().parents[1]

# The README's "Try the cluster path on one machine", line for line ($DATA, $RUNS set by the test).
SIMULATE = "simgan-dist simulate --out $DATA --synthetic 256 --real 128 --real-test 0 --preset tiny"
HEAD = "ray start --head --num-cpus 2"
CLIENT = "export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265"
TRAIN = ("ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/smoke.yaml "
         "--set data.synthetic=$DATA/synthetic --set data.real=$DATA/real --set train.storage_path=$RUNS")
# Folders only: Ray Train keeps a checkpoint_manager_snapshot.json beside them.
CHECKPOINT = "$(ls -d $RUNS/smoke/checkpoint_*/ | tail -1)"
REFINE = (f"ray job submit --working-dir . -- python jobs/refine.py --preset tiny --checkpoint {CHECKPOINT} "
          "--input $DATA/synthetic --out $DATA/refined")
# Its entrypoint and config run on the multi-node cluster in tests/test_multinode.py (a sweep whose
# nodes are lost), which checks the sweep's console lines; here only that the README shows it.
TUNE = ("ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune-smoke.yaml "
        "--set data.synthetic=$DATA/synthetic --set data.real=$DATA/real --set tune.output=$RUNS/sweeps")

# Jobs submitted after training: name -> (command, check of what it wrote given the test's env).
JOBS = {
    "refine": (REFINE, lambda env: read_manifest(f"{env['DATA']}/refined").rows == 256),
}

# Framework output a quiet console must not show, and --verbose must bring back.
NOISE = ["Reporting training result", "TrainingReport(", "(RayTrainWorker pid=", "Starting execution of Dataset"]
NEVER = ["Token authentication is enabled", "PreemptionWatcher", "Traceback"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(command: str, env: dict[str, str], timeout: float = 420, check: bool = True) -> str:
    run = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if check:
        assert run.returncode == 0, f"{command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout + run.stderr


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """Our head's processes (they name its session folder) and everything they started."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        with_dir = any(temp_dir in part for part in (proc.info["cmdline"] or []))
        if with_dir and proc.pid != os.getpid():
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def _train_workers(temp_dir: str) -> list[psutil.Process]:
    """Our head's Ray Train worker processes (Ray renames them `ray::RayTrainWorker…`)."""
    found = []
    for proc in _head_processes(temp_dir):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def _stop_head(temp_dir: str) -> None:
    """What `ray stop` does, limited to this head: on a shared machine `ray stop` ends every Ray."""
    procs = _head_processes(temp_dir)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        proc.kill()


def _job_id(submit_output: str) -> str:
    return re.search(r"Job '([^']+)' submitted successfully", submit_output).group(1)


def _wait_for_jobs_api(env: dict[str, str], timeout: float = 300) -> None:
    """`ray start` returns before the dashboard (the jobs API) answers."""
    deadline = time.monotonic() + timeout
    while "Failed to connect" in (out := _sh("ray job list", env, timeout=60, check=False)):
        if time.monotonic() > deadline:
            logs = glob.glob(f"{env['TMPDIR']}/ray/session_latest/logs/dashboard.*")
            tails = {log: Path(log).read_text()[-2000:] for log in logs}
            pytest.fail(f"the jobs API did not answer within {timeout} s: {out[-500:]}\n{tails}")
        time.sleep(2)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # Short: Ray's unix sockets live under it and their paths may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    work = tmp_path_factory.mktemp("cluster-demo")
    dashboard = _free_port()
    # As a user's shell: none of the settings a command run in this process may have left behind.
    left = ("RAY_ADDRESS", "PYTHONPATH", "RAY_AUTH_MODE", "RAY_DATA_LOGGING_CONFIG", "RAY_DEDUP_LOGS")
    env = {k: v for k, v in os.environ.items() if k not in left}
    env.update(TMPDIR=temp_dir, DATA=str(work / "data"), RUNS=str(work / "runs"), DS_ACCELERATOR="cpu",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")  # `ray`, `simgan-dist` of this venv
    ports = (f" --port {_free_port()} --dashboard-port {dashboard} --ray-client-server-port {_free_port()}"
             f" --dashboard-agent-listen-port {_free_port()} --disable-usage-stats")
    try:
        _sh(HEAD + ports, env, timeout=120)
        client = {**env, **dict(kv.split("=", 1) for kv in CLIENT.removeprefix("export ").split())}
        client["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        # The CLI runs from the checkout under test, like a user's `make install`ed one.
        _sh(SIMULATE, {**client, "PYTHONPATH": str(REPO)}, timeout=120)
        _wait_for_jobs_api(client)
        yield client
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_readme_shows_the_commands_this_test_runs():
    readme = (REPO / "README.md").read_text()
    for command in (SIMULATE, HEAD, CLIENT, TRAIN, TUNE, *(command for command, _ in JOBS.values())):
        assert command in readme, command


@pytest.mark.slow
def test_token_authentication_is_on(head):
    without_token = {k: v for k, v in head.items() if k != "RAY_AUTH_MODE"}
    out = _sh("ray job list", without_token, timeout=60, check=False)
    assert "Missing authentication token" in out
    assert "SUCCEEDED" not in out


def _saved_history(runs: str) -> dict[int, int]:
    """step -> history images, of each checkpoint of the smoke run saved so far."""
    import torch

    from simgan_dist.train.checkpoint import STATE_FILE
    from simgan_dist.train.distributed_history import history_images

    saved = {}
    for state_file in glob.glob(f"{runs}/smoke/checkpoint_*/{STATE_FILE}"):
        state = torch.load(state_file, weights_only=False)
        saved[sum(state["algorithm"].values())] = history_images(state["history"])
    return saved


@pytest.fixture(scope="module")
def trained(head):
    """Train submitted with --verbose and stopped after its first checkpoint, then the README's
    command again: (the stopped job's logs, the resumed job's logs, step -> history images of each
    checkpoint the stopped job saved)."""
    stopped_id = "smoke-stopped"
    _sh(TRAIN.replace("submit", f"submit --no-wait --submission-id {stopped_id}") + " --verbose", head)
    # Only a checkpoint Ray Train has registered is one a new run resumes from. The smoke run's
    # remaining steps take a second or two: its workers are frozen once one is registered, so that
    # the stop lands mid-run however fast the machine (they die with the job).
    snapshot = Path(head["RUNS"], "smoke", "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + 400
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        if time.monotonic() > deadline:
            pytest.fail(f"no registered checkpoint within 400 s:\n{_sh(f'ray job logs {stopped_id}', head)[-3000:]}")
        time.sleep(0.05)
    workers = _train_workers(head["TMPDIR"])
    for worker in workers:
        worker.suspend()
    assert workers and not _sh(f"ray job status {stopped_id}", head, timeout=60).lower().count("succeeded")
    while "Reporting training result" not in (logs := _sh(f"ray job logs {stopped_id}", head, timeout=60)):
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(1)
    _sh(f"ray job stop {stopped_id}", head, timeout=120)
    assert "stopped" in _sh(f"ray job status {stopped_id}", head, timeout=60).lower()
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    stopped_logs = _sh(f"ray job logs {stopped_id}", head, timeout=60)
    saved = _saved_history(head["RUNS"])

    submitted = _sh(TRAIN, head)
    assert "succeeded" in submitted
    return stopped_logs, _sh(f"ray job logs {_job_id(submitted)}", head, timeout=60), saved


@pytest.mark.slow
def test_train_job_stopped_mid_run_resumes_when_submitted_again(trained, head):
    """`ray job stop` ends the driver (SIGTERM, SIGKILL 3 s later): the same command again continues
    from the latest checkpoint with that checkpoint's buffer."""
    stopped, resumed, saved = trained
    found = re.search(r"\[smoke\] resumed at step ([1-9]\d*)/38 with (\d+) history images", resumed)
    assert found, resumed
    step, images = map(int, found.groups())
    assert saved.get(step) == images > 0, (saved, step, images)
    assert "joined the Ray cluster" in resumed and "from RAY_ADDRESS" in resumed
    assert "2 worker(s) x 0.25 CPU (+1 CPU for Ray Data, 0.5 CPU for 2 history shard(s))" in resumed
    assert re.search(r"\[38/38 adversarial\] R loss \S+ \| R adv \S+ \| R reg \S+ \| D loss \S+ \| "
                     r"D acc real/refined [\d.]+/[\d.]+", resumed), resumed
    checkpoint = re.search(r"^checkpoint: (\S+)$", resumed, re.M).group(1)
    assert Path(checkpoint, "refiner.pt").exists()
    assert Path(head["RUNS"], "smoke", "monitor", "metrics.jsonl").exists()
    for line in NOISE + NEVER:
        assert line not in resumed, line
    # --verbose brings Ray's own output back into the job's logs
    for line in NOISE:
        assert line in stopped, line


@pytest.mark.parametrize("name", list(JOBS))
@pytest.mark.slow
def test_submitted_job_after_training(name, trained, head):
    command, wrote_it = JOBS[name]
    submitted = _sh(command, head)
    assert "succeeded" in submitted
    logs = _sh(f"ray job logs {_job_id(submitted)}", head, timeout=60)
    assert wrote_it(head), logs
    for line in NOISE + NEVER:
        assert line not in logs, line


@pytest.mark.slow
def test_cli_on_the_head_node_joins_its_cluster(trained, head):
    """What failed with "num_cpus and num_gpus must not be provided": a command run on a machine
    where `ray start` registered a cluster joins that cluster."""
    out = _sh(f"simgan-dist refine --preset tiny --checkpoint {CHECKPOINT} --input $DATA/synthetic "
              "--out $DATA/refined-on-head", {**head, "PYTHONPATH": str(REPO)})
    assert "joined the Ray cluster at " in out, out
    assert f"(from {head['TMPDIR']}/ray/ray_current_cluster)" in out, out
    assert read_manifest(f"{head['DATA']}/refined-on-head").rows == 256
