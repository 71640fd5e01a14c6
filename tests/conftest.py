"""Shared fixtures: a real S3 endpoint on loopback (moto server mode), a real MLflow tracking server on
loopback and a local Ray instance.

The `slow` marker: every test that starts Ray, DeepSpeed (torch.distributed) or the S3 server,
in-process or in a subprocess, carries it; `make test-fast` (`pytest -m "not slow"`) leaves them out.
Two checks keep the marker honest:

* collection: a test that uses `ray_local`, `s3_server`, `s3_bucket` or `mlflow_server` (directly or through another
  fixture) without the marker stops the run before anything starts (`HEAVY_FIXTURES`);
* run time: a test without the marker that leaves Ray or torch.distributed initialized fails, and so
  does any test that starts Ray other than through `ray_local` (the session shares one instance).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from simgan_dist.console import configure_console

# Ray's environment as every command sets it, before any test module imports Ray: Ray's driver reads
# RAY_AUTH_MODE once, at import, while a Ray it starts reads it at start. A CLI test run in-process
# (configure_console: RAY_AUTH_MODE=token) after Ray was imported but before `ray_local` started it
# left the driver without auth and the instance with token auth: "AuthenticationError ...
# RAY_AUTH_MODE is currently 'disabled'" at ray.init.
configure_console(verbose=False)
RAY_SETTINGS = ("RAY_AUTH_MODE", "RAY_DEDUP_LOGS", "RAY_DATA_LOGGING_CONFIG")
# Ray Train's controller polls its workers every 2 s, so each run ends up to 2 s after its last
# step; the suite runs ~25 of them. Every Ray the tests start inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Fitted realism networks (metrics/realism.py) go to a folder of this session's, not the user's cache.
os.environ["SIMGAN_DIST_CACHE"] = tempfile.mkdtemp(prefix="simgan-dist-cache-")
atexit.register(shutil.rmtree, os.environ["SIMGAN_DIST_CACHE"], ignore_errors=True)

HEAVY_FIXTURES = frozenset({"ray_local", "s3_server", "s3_bucket", "mlflow_server"})
SLOW = "slow"

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; AWS_* variables point at it for the whole session.

    Yields the endpoint URL (http://127.0.0.1:PORT). Ray workers started after this
    fixture inherit the variables, so they reach the same endpoint.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the loopback endpoint; yields "s3://<name>"."""
    import boto3

    _require_slow(request.node, "s3_bucket")  # also when asked for by request.getfixturevalue

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                          aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"


@dataclass
class MlflowServer:
    """An `mlflow server` process on 127.0.0.1 with a SQLite store (tests read it directly: `db`)."""

    uri: str
    db: Path
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own process group: uvicorn's worker too
            self.process.wait()


def start_mlflow_server(folder: Path, timeout_s: float = 90.0) -> MlflowServer:
    """A real tracking server on a free loopback port, storing in `folder`; returns once it answers /health.
    One uvicorn worker and no job runner: it starts in seconds (a second one on the same store faster)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(folder / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        stdout=(folder / f"server-{port}.log").open("w"), stderr=subprocess.STDOUT)
    server = MlflowServer(f"http://127.0.0.1:{port}", db, process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(f"{server.uri}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"mlflow server did not start; see {folder}/server-{port}.log")


@pytest.fixture(scope="session")
def mlflow_server():
    """A real `mlflow server` on loopback for the session (tests give its `uri` as tracking.mlflow_uri)."""
    folder = Path(tempfile.mkdtemp(prefix="simgan-mlflow-"))
    server = start_mlflow_server(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance with 4 CPUs for the session (reused if one is already running).

    Depends on `s3_server` so that Ray's workers start with the loopback endpoint in
    their environment.
    """
    import ray

    global _ray_local_up
    started = not ray.is_initialized()
    if started:
        # address="local": a cluster another process registered on this machine (`ray start`, a
        # multi-node test) is never joined by accident
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    _ray_local_up = True
    yield ray
    _ray_local_up = False
    if started:
        ray.shutdown()


# --- the `slow` marker ------------------------------------------------------------------------------


def _require_slow(item, why: str) -> None:
    if item.get_closest_marker(SLOW) is None and item.get_closest_marker("gpu") is None:
        pytest.fail(f"{item.nodeid} uses {why} but is not marked @pytest.mark.{SLOW} (see tests/conftest.py)",
                    pytrace=False)


def unmarked_heavy_tests(items) -> list[str]:
    """The tests that use a heavy fixture (any depth) without the slow (or gpu) marker."""
    return [f"{item.nodeid} (uses {', '.join(sorted(HEAVY_FIXTURES & set(item.fixturenames)))})"
            for item in items
            if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
            and item.get_closest_marker(SLOW) is None and item.get_closest_marker("gpu") is None]


@pytest.hookimpl(trylast=True)  # after tests/gpu/conftest.py adds its marker
def pytest_collection_modifyitems(config, items):
    if unmarked := unmarked_heavy_tests(items):
        raise pytest.UsageError(f"tests that start Ray or the S3 server must be marked @pytest.mark.{SLOW} "
                                "(pytestmark for a whole module):\n  " + "\n  ".join(unmarked))


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _distributed_running() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


_ray_local_up = False  # set while the ray_local fixture holds the session's instance
_BEFORE = pytest.StashKey[tuple[bool, bool]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[_BEFORE] = (_ray_running(), _distributed_running())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a test that failed on its own is reported as such
    if item.get_closest_marker("gpu") is not None:
        return result  # tests/gpu brings its own ray_local (no S3 server there)
    ray_before, dist_before = item.stash.get(_BEFORE, (True, True))
    if not ray_before and _ray_running():
        if not _ray_local_up:
            import ray

            ray.shutdown()  # not this test's instance to leave behind: later tests need ray_local's
            pytest.fail(f"{item.nodeid} started its own Ray instance: use the ray_local fixture "
                        "(one instance for the session)", pytrace=False)
        _require_slow(item, "Ray")
    if not dist_before and _distributed_running():
        _require_slow(item, "torch.distributed (DeepSpeed)")
    return result


@pytest.fixture(autouse=True)
def _ray_settings_restored():
    """A test that runs a command in-process (`--verbose` changes Ray's console settings) leaves the
    session's settings as conftest set them."""
    saved = {name: os.environ.get(name) for name in RAY_SETTINGS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def unityeyes_dir(tmp_path):
    """A UnityEyes folder of 4 good samples and 6 bad ones (tests/unityeyes_folder.py)."""
    from unityeyes_folder import unityeyes_folder

    unityeyes_folder(tmp_path / "UnityEyes")
    return tmp_path / "UnityEyes"
