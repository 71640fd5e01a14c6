"""MLflow tracking (simgan_dist/tracking.py) against a real `mlflow server` on loopback.

The distributed trainer's tracking (one run from 2 workers, a resubmission continuing it) is checked in
tests/train/test_train.py, a sweep's nesting in tests/test_tune.py, refine's and evaluate's runs in
tests/test_evaluate.py: those tests run anyway, tracked they cost seconds more.
"""

from __future__ import annotations

import threading
import time

import pytest
from leak_check import FAKE, every_output, leaked
from toy_domains import toy_images

from simgan_dist import tracking
from simgan_dist.config import load_config
from simgan_dist.errors import ConfigError
from simgan_dist.train.local import train_local

SHORT = ["train.pretrain_refiner_steps=4", "train.pretrain_disc_steps=2", "train.report_every=2",
         "train.image_every=6", "train.checkpoint_every=6"]


def test_tracking_keys_are_checked():
    with pytest.raises(ConfigError, match="unknown config key 'tracking.mlflow_url'"):
        load_config("tiny", overrides=["tracking.mlflow_url=http://localhost:5000"])
    with pytest.raises(ConfigError, match="tracking.mlflow_uri: 'localhost:5000' is not an MLflow tracking URI"):
        load_config("tiny", overrides=["tracking.mlflow_uri=localhost:5000"])
    with pytest.raises(ConfigError, match="holds a password"):
        load_config("tiny", overrides=["tracking.mlflow_uri=https://me:pw@mlflow.example.com"])
    assert load_config("tiny").tracking.mlflow_uri == ""  # off unless set here or in MLFLOW_TRACKING_URI


def test_an_unreachable_server_is_one_warning_and_the_run_goes_on(monkeypatch):
    with socket_closed() as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        said = []
        start = time.monotonic()
        with tracking.training_run(load_config("tiny"), resume_from=None, say=said.append) as tracker:
            tracker.metrics(1, {"refiner/loss": 1.0})
        assert time.monotonic() - start < 20  # seconds, not MLflow's default minutes of retries
    assert not tracker.on
    assert len(said) == 1 and said[0].startswith("tracking: warning: could not start an MLflow run at http://127")


class socket_closed:
    """A loopback URI nothing listens on."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{probe.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.slow
def test_local_run_logs_resumes_the_same_run_and_survives_a_killed_server(mlflow_server, tmp_path, capsys):
    """`train --local`'s run: params (the config, secrets redacted), metric history, preview grids and
    the checkpoint tag; resumed, it continues the same MLflow run; no secret reaches the store. Then a
    run whose server is killed mid-run finishes, says so once, and lists what was not logged."""
    from conftest import start_mlflow_server
    from mlflow import MlflowClient

    synthetic, real = toy_images(96, 0, real=False), toy_images(96, 1, real=True)
    secrets = [f"storage.{key}={value}" for key, value in FAKE.items()]
    tracked = [*SHORT, f"tracking.mlflow_uri={mlflow_server.uri}", "tracking.experiment=local", *secrets]
    train_local(load_config("tiny", overrides=[*tracked, "train.iterations=6"]), tmp_path / "run", synthetic, real,
                progress=False)
    train_local(load_config("tiny", overrides=[*tracked, "train.iterations=8"]), tmp_path / "run", synthetic, real,
                progress=False)
    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "simgan"
    assert run.data.params["train.k_g"] == "2" and run.data.params["storage.secret_access_key"] == ""
    assert run.data.tags["simgan.checkpoint"] == str((tmp_path / "run" / "checkpoint").resolve())
    assert run.data.tags["config_change.train.iterations"] == "6 -> 8"  # params cannot change; tags say it
    assert [m.step for m in client.get_metric_history(run.info.run_id, "refiner/adv_loss")][-3:] == [10, 12, 14]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "images")][-1].endswith("0000014.png")
    assert tracking.saved_run_id(str(tmp_path / "run" / "checkpoint")) == run.info.run_id
    # refine (and evaluate) with this checkpoint: linked to its run, in its experiment
    cfg = load_config("tiny", overrides=[f"tracking.mlflow_uri={mlflow_server.uri}"])
    with tracking.stage_run(cfg, "refine", str(tmp_path / "run" / "checkpoint"), {}) as refine_run:
        pass
    linked = client.get_run(refine_run.run_id)
    assert linked.data.tags["simgan.source_run_id"] == run.info.run_id
    assert linked.info.experiment_id == run.info.experiment_id and linked.info.status == "FINISHED"
    assert not leaked(every_output(None, None, mlflow_server.db.parent))
    assert not any(secret in capsys.readouterr().out for secret in FAKE.values())

    # a second server on the same store, killed once the run has logged a report
    doomed = start_mlflow_server(mlflow_server.db.parent)

    def logged_a_report() -> bool:
        found = client.get_experiment_by_name("killed")
        return found is not None and any(r.data.metrics for r in client.search_runs([found.experiment_id]))

    threading.Thread(target=lambda: (_wait_for(logged_a_report), doomed.stop()), daemon=True).start()
    cfg = load_config("tiny", overrides=[*SHORT, f"tracking.mlflow_uri={doomed.uri}", "tracking.experiment=killed",
                                         "train.iterations=16"])
    done = train_local(cfg, tmp_path / "killed", synthetic, real, progress=False)
    assert done.metrics and (tmp_path / "killed" / "checkpoint" / "refiner.pt").exists()
    printed = capsys.readouterr().out
    assert printed.count("tracking: warning: MLflow at") == 1, printed
    assert "tracking: not logged to MLflow run" in printed and "metric report" in printed, printed
    [killed] = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert client.get_metric_history(killed.info.run_id, "refiner/reg_loss")  # what it logged before stays


def _wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
