"""Credentials are never written (issue 12, item 5): the whole pipeline runs against the loopback
S3 endpoint with recognisable fake credentials given in the config, and no output file holds them."""

from __future__ import annotations

import os

import pytest
from test_data_ingest import unityeyes_dir  # noqa: F401  (fixture)

from simgan_dist.cli import build_parser
from simgan_dist.config import StorageConfig, config_from_dict, load_config
from simgan_dist.data import storage

pytest.importorskip("ray")

# moto accepts any credentials: these are what a user would have in their config.
FAKE = {
    "access_key_id": "AKIAFAKEKEY7QX2LEAKCHECK",
    "secret_access_key": "fakeSecret/9f8e7d6c5b4aLeakCheck",
    "session_token": "FakeSessionToken0a1b2c3dLeakCheck",
}


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


def leaked(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """(file, secret) for each FAKE secret found in a file."""
    return [(name, secret) for name, data in files.items() for secret in FAKE.values() if secret.encode() in data]


def every_output(s3_server, bucket: str | None, *folders) -> dict[str, bytes]:
    """Every object in `bucket` (None: no bucket) and every file under `folders`, by name."""
    import boto3

    files = {}
    if bucket is not None:
        client = boto3.client("s3", endpoint_url=s3_server)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                files[f"s3://{bucket}/{obj['Key']}"] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        files[path] = f.read()
    return files


@pytest.mark.slow
def test_pipeline_with_fake_credentials_writes_them_nowhere(ray_local, s3_server, s3_bucket, unityeyes_dir,  # noqa: F811
                                                           tmp_path, capsys):
    import ray

    from simgan_dist.data.ingest import ingest
    from simgan_dist.data.simulate import simulate_dataset
    from simgan_dist.evaluate import cli_evaluate
    from simgan_dist.refine import refine
    from simgan_dist.train.driver import checkpoint_uri, fit

    secrets = [f"storage.{k}={v}" for k, v in FAKE.items()]
    data = f"{s3_bucket}/eyes"
    cfg = load_config("tiny", overrides=[
        *secrets, f"data.synthetic={data}/synthetic", f"data.real={data}/real", f"train.storage_path={s3_bucket}/runs",
        "train.name=leak", "train.iterations=2", "train.pretrain_refiner_steps=2", "train.pretrain_disc_steps=1",
        "train.checkpoint_every=5", "train.report_every=5", "train.image_every=5"])
    simulate_dataset(data, 96, 64, 64, seed=5, rows_per_shard=48, storage_cfg=cfg.storage, parallel=True)
    ingest("unityeyes", unityeyes_dir, f"{s3_bucket}/unityeyes", cfg=cfg, workers=1)
    result = fit(cfg)
    assert result.error is None
    checkpoint = checkpoint_uri(cfg, result.checkpoint)
    refine(checkpoint, f"{data}/synthetic", f"{data}/refined", cfg, progress=False)
    report = tmp_path / "report"
    args = build_parser().parse_args([
        "evaluate", "--synthetic", f"{data}/synthetic", "--refined", f"{data}/refined", "--real-test",
        f"{data}/real_test", "--out", str(report), "--preset", "tiny", "--no-ray",
        "--set", "evaluate.gaze_epochs=1", "--set", "evaluate.realism_samples=32",
        *[x for s in secrets for x in ("--set", s)]])
    assert cli_evaluate(args) == 0

    session_logs = ray._private.worker._global_node.get_session_dir_path()
    files = every_output(s3_server, s3_bucket.removeprefix("s3://"), report, session_logs)
    written = [name for name in files if name.endswith("config.yaml")]
    assert written and any("/runs/leak/checkpoint_" in name for name in written)
    assert any(name.endswith("_refine_job.json") for name in files) and (report / "report.html").exists()
    assert not leaked(files)
    printed = capsys.readouterr()
    assert not any(v in printed.out + printed.err for v in FAKE.values())
