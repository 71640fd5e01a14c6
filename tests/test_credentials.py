"""Credentials are never written (issue 12, item 5): the whole pipeline runs against the loopback
S3 endpoint with recognisable fake credentials given in the config, and no output file holds them."""

from __future__ import annotations

import os

import pytest
from leak_check import FAKE, every_output, leaked

from simgan_dist.cli import build_parser
from simgan_dist.config import StorageConfig, config_from_dict, load_config
from simgan_dist.data import storage

pytest.importorskip("ray")


def test_serialised_configs_never_hold_secrets():
    cfg = load_config("tiny", overrides=[f"storage.{k}={v}" for k, v in FAKE.items()])
    text = cfg.to_yaml()
    assert not any(v in text for v in FAKE.values())
    assert text.startswith("# storage.access_key_id, storage.secret_access_key, storage.session_token: set, not")
    assert not any(v in str(cfg.to_dict()) for v in FAKE.values())
    assert config_from_dict(cfg.to_dict()).storage == StorageConfig()  # "" = use the environment
    assert cfg.to_dict(redact=False)["storage"]["secret_access_key"] == FAKE["secret_access_key"]


@pytest.mark.slow
def test_session_token_reaches_ray_workers_through_their_environment(ray_local, monkeypatch):
    from simgan_dist.data.pipeline import parallel_map

    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE["session_token"])
    env = storage.worker_env(StorageConfig())
    assert env["AWS_SESSION_TOKEN"] == FAKE["session_token"] and env["AWS_ACCESS_KEY_ID"] == "testing"
    seen = parallel_map(lambda name: os.environ.get(name), [("AWS_SESSION_TOKEN",), ("AWS_ACCESS_KEY_ID",)], env=env)
    assert seen == [FAKE["session_token"], "testing"]
    # Keys given in the config take their own token, never the environment's.
    explicit = storage.worker_env(StorageConfig(access_key_id="a", secret_access_key="b"))
    assert "AWS_SESSION_TOKEN" not in explicit


@pytest.mark.slow
def test_pipeline_with_fake_credentials_writes_them_nowhere(ray_local, s3_server, s3_bucket, unityeyes_dir,  # noqa: F811
                                                           tmp_path, capsys):
    import ray

    from simgan_dist.data.ingest import ingest
    from simgan_dist.data.simulate import simulate_dataset
    from simgan_dist.evaluate import cli_evaluate
    from simgan_dist.refine import refine
    from simgan_dist.train.local import train_local

    secrets = [f"storage.{k}={v}" for k, v in FAKE.items()]
    data = f"{s3_bucket}/eyes"
    cfg = load_config("tiny", overrides=[
        *secrets, f"data.synthetic={data}/synthetic", f"data.real={data}/real", "train.iterations=2",
        "train.pretrain_refiner_steps=2", "train.pretrain_disc_steps=1", "train.checkpoint_every=5",
        "train.report_every=5", "train.image_every=5"])
    simulate_dataset(data, 96, 64, 64, seed=5, rows_per_shard=48, storage_cfg=cfg.storage, parallel=True)
    ingest("unityeyes", unityeyes_dir, f"{s3_bucket}/unityeyes", cfg=cfg, workers=1)
    # Ray Train on S3 with these secrets: tests/train/test_train.py::test_two_workers_end_to_end_on_s3_then_resubmitted
    run = train_local(cfg, tmp_path / "leak", progress=False)
    refine(str(run.checkpoint), f"{data}/synthetic", f"{data}/refined", cfg, progress=False)
    report = tmp_path / "report"
    args = build_parser().parse_args([
        "evaluate", "--synthetic", f"{data}/synthetic", "--refined", f"{data}/refined", "--real-test",
        f"{data}/real_test", "--out", str(report), "--preset", "tiny", "--no-ray",
        "--set", "evaluate.gaze_epochs=1", "--set", "evaluate.realism_samples=32",
        *[x for s in secrets for x in ("--set", s)]])
    assert cli_evaluate(args) == 0

    session_logs = ray._private.worker._global_node.get_session_dir_path()
    files = every_output(s3_server, s3_bucket.removeprefix("s3://"), report, tmp_path / "leak", session_logs)
    assert any(name.endswith("/leak/checkpoint/config.yaml") for name in files)
    assert any(name.endswith("_refine_job.json") for name in files) and (report / "report.html").exists()
    assert not leaked(files)
    printed = capsys.readouterr()
    assert not any(v in printed.out + printed.err for v in FAKE.values())
