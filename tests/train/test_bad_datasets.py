"""Bad datasets and runs that cannot be mixed up (issue 12, items 3 and 7): each is a UserError naming
the file and field (or the config key) before any training step or GPU time."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from simgan_dist.config import load_config
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.data.schema import (
    MANIFEST_NAME,
    DatasetError,
    Layout,
    load_numpy,
    validate,
)
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.data.writer import DatasetWriter, encode_shard
from simgan_dist.errors import UserError
from simgan_dist.train.checkpoint import write_checkpoint
from simgan_dist.train.driver import check_corpora, check_resumable
from simgan_dist.train.local import train_local


@pytest.fixture
def eyes(tmp_path):
    simulate_dataset(str(tmp_path / "eyes"), 40, 20, 0, seed=4, rows_per_shard=20, parallel=False)
    return tmp_path / "eyes"


def manifest_of(folder):
    return json.loads((folder / MANIFEST_NAME).read_text())


def replace_shard(folder, table: pa.Table, fix_manifest: bool = True):
    """Put `table` in place of shard 0 (and, like a careless tool would, update the manifest to match)."""
    data, digest = encode_shard(table)
    (folder / "part-00000.parquet").write_bytes(data)
    if fix_manifest:
        manifest = manifest_of(folder)
        manifest["shards"][0].update(bytes=len(data), sha256=digest, rows=table.num_rows)
        manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_truncated_shard_names_the_file(eyes):
    shard = eyes / "synthetic" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(DatasetError, match=r"synthetic/part-00000.parquet: \d+ bytes, the manifest says"):
        validate(str(eyes / "synthetic"))


def test_corrupt_shard_of_the_same_size_fails_its_checksum(eyes):
    shard = eyes / "synthetic" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="part-00000.parquet: sha256 does not match the manifest"):
        validate(str(eyes / "synthetic"), verify_checksums=True)
    with pytest.raises(DatasetError, match="part-00000.parquet: sha256"):
        load_numpy(str(eyes / "synthetic"))


def test_wrong_image_byte_length_or_dtype_names_file_and_column(eyes):
    folder = eyes / "real"
    table = pq.read_table(folder / "part-00000.parquet")
    short = pa.array([b[:-1] for b in table.column("image").to_pylist()], pa.binary(35 * 55 - 1))
    replace_shard(folder, table.set_column(table.schema.get_field_index("image"), "image", short))
    with pytest.raises(DatasetError, match=r"real/part-00000.parquet: column 'image' has type "
                                           r"fixed_size_binary\[1924\], the manifest says fixed_size_binary\[1925\]"):
        validate(str(folder))
    manifest = manifest_of(folder)
    manifest["image_dtype"] = "uint16"  # the manifest claims depth images, the shards hold uint8 eyes
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"column 'image' has type .*the manifest says fixed_size_binary\[3850\]"):
        validate(str(folder))


def test_nan_or_missing_labels_are_refused_at_write_time(tmp_path):
    layout = Layout((35, 55, 1), "uint8", {"gaze": (3,)})
    gaze = np.ones((2, 3), np.float32)
    gaze[1, 2] = np.nan
    batch = {"id": np.array(["a", "b"], object), "image": np.zeros((2, 35, 55, 1), np.uint8), "gaze": gaze}
    with pytest.raises(DatasetError, match="gaze: labels contain NaN"), DatasetWriter(
            str(tmp_path / "ds"), layout, kind="synthetic", source="t") as writer:
        writer.write(batch)
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()
    with pytest.raises(DatasetError, match="batch is missing column 'gaze'"), DatasetWriter(
            str(tmp_path / "ds2"), layout, kind="synthetic", source="t") as writer:
        writer.write({"id": batch["id"], "image": batch["image"]})


def test_missing_or_mismatched_manifest(eyes):
    (eyes / "real" / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetError, match=r"real: incomplete dataset: 1 shard\(s\) but no _manifest.json"):
        validate(str(eyes / "real"))
    folder = eyes / "synthetic"
    manifest = manifest_of(folder)
    manifest["shards"][0]["rows"] += 1
    manifest["rows"] += 1
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"synthetic/part-00000.parquet: 20 rows, the manifest says 21"):
        validate(str(folder))


def test_empty_or_too_small_corpora_stop_training_before_it_starts(tmp_path, eyes):
    simulate_dataset(str(tmp_path / "empty"), 0, 0, 0, parallel=False)
    assert validate(str(tmp_path / "empty" / "real")).rows == 0
    base = [f"data.synthetic={eyes}/synthetic", "train.batch_size=16"]
    for real, rows in ((tmp_path / "empty" / "real", 0), (eyes / "real", 20)):
        cfg = load_config("tiny", overrides=[*base, f"data.real={real}", "train.num_workers=2"])
        with pytest.raises(UserError, match=rf"data.real .*: {rows} rows, fewer than one batch per worker "
                                            r"\(train.batch_size 16 x train.num_workers 2 = 32\)"):
            check_corpora(cfg)
    # 20 rows are enough for one batch of 16, but not once the objective's validation rows are held out
    check_corpora(load_config("tiny", overrides=[*base, f"data.real={eyes}/real"]))
    held = load_config("tiny", overrides=[*base, f"data.real={eyes}/real", "train.eval_every=5",
                                          "data.real_val_fraction=0.5"])
    with pytest.raises(UserError, match=r"data.real .*: \d+ rows once the objective's validation rows "
                                        r"\(data.real_val_fraction\) are held out, fewer than one batch"):
        check_corpora(held)
    cfg = load_config("tiny", overrides=[*base, f"data.real={eyes}/real", "model.image_width=56"])
    with pytest.raises(UserError, match=r"data.synthetic .*images are \[35, 55, 1\].*expects \[35, 56, 1\]"):
        check_corpora(cfg)
    small = load_config("tiny", overrides=["train.batch_size=32"])
    with pytest.raises(DatasetError, match=r"data.real: 20 images, fewer than one batch \(train.batch_size 32\)"):
        train_local(small, tmp_path / "run", np.zeros((64, 35, 55, 1), np.uint8), np.zeros((20, 35, 55, 1), np.uint8))


def test_a_reused_run_name_with_another_model_or_worker_count_is_refused(tmp_path):
    saved = load_config("tiny", overrides=[f"train.storage_path={tmp_path}", "train.name=r", "train.zero_stage=2",
                                           "train.num_workers=2"])
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000000", saved, build_refiner(saved.model),
                     build_discriminator(saved.model))
    check_resumable(saved)  # the same settings continue the run
    for change, message in (("model.refiner_blocks=2", r"model.refiner_blocks: 1 there, 2 now"),
                            ("train.num_workers=3", r"train.zero_stage/num_workers: 2/2 there, 2/3 now"),
                            ("train.buffer_shards=3", r"train.buffer_shards: 2 there, 3 now")):
        cfg = load_config("tiny", overrides=[f"train.storage_path={tmp_path}", "train.name=r", "train.zero_stage=2",
                                             "train.num_workers=2", change])
        with pytest.raises(UserError, match=rf"train.name 'r' already has a run at .*{message}"):
            check_resumable(cfg)
    other = load_config("tiny", overrides=[f"train.storage_path={tmp_path}", "train.name=fresh",
                                           "model.refiner_blocks=2"])
    check_resumable(other)  # a new name starts afresh


def test_resuming_under_changed_data_or_optimizer_needs_allow_config_change(eyes, tmp_path):
    """Issue 24 item 10: both trainers compare the checkpoint's config with the new one."""
    base = ["train.iterations=2", "train.pretrain_refiner_steps=1", "train.pretrain_disc_steps=1",
            "train.report_every=100", "train.image_every=100", "train.checkpoint_every=100", "train.eval_every=0",
            "train.batch_size=16", f"data.synthetic={eyes}/synthetic", f"data.real={eyes}/real"]
    run = tmp_path / "run"
    train_local(load_config("tiny", overrides=base), run, progress=False)
    other = tmp_path / "other"
    simulate_dataset(str(other), 40, 20, 0, seed=5, rows_per_shard=20, parallel=False)
    for change, message in (("train.lr=5e-4", r"train.lr: 0.001 there, 0.0005 now"),
                            (f"data.real={other}/real", rf"data.real: '{eyes}/real' there, '{other}/real' now"),
                            ("loss.lambda_reg=1", r"loss.lambda_reg: 0.0001 there, 1.0 now")):
        with pytest.raises(UserError, match=rf"{run}/checkpoint was trained with another config \({message}\): "
                                            ".*train.allow_config_change=true"):
            train_local(load_config("tiny", overrides=[*base, change]), run, progress=False)
    # cadence, length, determinism and spelling of the same folder are not changes
    same = [*[o for o in base if not o.startswith("data.")], f"data.synthetic={eyes}/../eyes/synthetic",
            f"data.real={eyes}/real", "train.iterations=3", "train.report_every=1", "train.checkpoint_every=1",
            "train.deterministic=false"]
    train_local(load_config("tiny", overrides=same), run, progress=False)
    assert not (run / "config_changes.jsonl").exists()
    allowed = load_config("tiny", overrides=[*same, "train.lr=5e-4", "train.iterations=4",
                                             "train.allow_config_change=true"])
    train_local(allowed, run, progress=False)
    (record,) = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record["resumed_from"] == str(run / "checkpoint") and record["changes"] == ["train.lr: 0.001 there, "
                                                                                      "0.0005 now"]
    assert "allow_config_change: true" in (run / "checkpoint" / "config.yaml").read_text()

    # the Ray driver's up-front check (train/driver.py check_resumable) does the same
    ray_run = [f"train.storage_path={tmp_path}", "train.name=r", *base]
    saved = load_config("tiny", overrides=ray_run)
    write_checkpoint(tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000000", saved, build_refiner(saved.model),
                     build_discriminator(saved.model))
    check_resumable(load_config("tiny", overrides=[*ray_run, "train.num_workers=2", "train.report_every=3"]))
    with pytest.raises(UserError, match=r"checkpoint_2026.* was trained with another config \(data.real: "):
        check_resumable(load_config("tiny", overrides=[*ray_run, f"data.real={other}/real"]))
    check_resumable(load_config("tiny", overrides=[*ray_run, f"data.real={other}/real",
                                                   "train.allow_config_change=true"]))
    assert "data.real: " in (tmp_path / "r" / "config_changes.jsonl").read_text()
