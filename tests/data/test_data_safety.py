"""Writing over a dataset: refused without --overwrite, atomic with it (a crash at any step leaves the
old dataset or the new one, for our readers and for plain Parquet readers alike)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from simgan_dist import cli
from simgan_dist.data import ingest as ingest_mod
from simgan_dist.data import simulate, storage
from simgan_dist.data.schema import DatasetError, Layout, load_numpy, validate
from simgan_dist.data.writer import DatasetWriter, make_manifest, write_manifest, write_shard

LAYOUT = Layout((4, 4, 1), "uint8", {"gaze": (3,)})
# Every storage call a write makes; a crash is the first failing call, and a dead process makes no more.
STEPS = ("write_bytes_atomic", "delete_files", "copy_file", "delete_dir")


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int) -> None:
    calls = [0]
    for name in STEPS:
        def fake(*args, _real=getattr(storage, name), **kwargs):
            calls[0] += 1
            if calls[0] >= step:
                raise Crash(f"killed at storage call {step}")
            return _real(*args, **kwargs)
        monkeypatch.setattr(storage, name, fake)


def write(uri: str, tag: str, n: int, overwrite: bool = False) -> None:
    rng = np.random.default_rng(n)
    with DatasetWriter(uri, LAYOUT, kind="real", source="test", rows_per_shard=2, overwrite=overwrite) as w:
        w.write({"id": np.array([f"{tag}-{i}" for i in range(n)], dtype=object),
                 "image": rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8),
                 "gaze": rng.normal(size=(n, 3)).astype(np.float32)})


def plain_ids(uri: str) -> set[str]:
    """What pandas reads from the prefix with its defaults (nothing when no shard is there)."""
    if not any(n.startswith("part-") for n in os.listdir(uri)):
        return set()
    return set(pd.read_parquet(uri, columns=["id"])["id"])


def assert_old_or_new(uri: str, old: set[str], new: set[str]) -> str:
    ids = set(load_numpy(uri, columns=["id"])["id"])
    assert ids in (old, new)
    seen = plain_ids(uri)
    assert seen <= old or seen <= new, "a plain reader saw rows of both generations"
    return "old" if ids == old else "new"


def test_existing_dataset_is_refused_without_overwrite(tmp_path, capsys):
    uri = str(tmp_path / "ds")
    write(uri, "old", 3)
    with pytest.raises(DatasetError, match=rf"{uri}: already holds a dataset \(_manifest.json\); pass --overwrite"):
        write(uri, "new", 3)
    os.remove(tmp_path / "ds" / "_manifest.json")  # shards alone are somebody's data too
    with pytest.raises(DatasetError, match=r"already holds a dataset \(part-00000.parquet\)"):
        write(uri, "new", 3)

    out = str(tmp_path / "sim")
    assert cli.main(["simulate", "--out", out, "--synthetic", "4", "--real", "2", "--real-test", "2"]) == 0
    before = load_numpy(f"{out}/real")["image"]
    assert cli.main(["simulate", "--out", out, "--synthetic", "4", "--real", "2", "--real-test", "2",
                     "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{out}/synthetic: already holds a dataset" in err and "--overwrite" in err
    np.testing.assert_array_equal(load_numpy(f"{out}/real")["image"], before)
    assert cli.main(["simulate", "--out", out, "--synthetic", "4", "--real", "2", "--real-test", "2",
                     "--seed", "1", "--overwrite"]) == 0
    assert load_numpy(f"{out}/real")["id"][0] == "real-1-000000000"


def test_overwrite_crashing_at_every_step_leaves_old_or_new(tmp_path, monkeypatch):
    uri = str(tmp_path / "ds")
    old, new = {f"old-{i}" for i in range(5)}, {f"new-{i}" for i in range(3)}
    outcomes = []
    for step in range(1, 100):
        write(uri, "old", 5, overwrite=True)
        with monkeypatch.context() as m:
            crash_at(m, step)
            try:
                write(uri, "new", 3, overwrite=True)
            except Crash:
                outcomes.append(assert_old_or_new(uri, old, new))
                continue
        break
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "new" in outcomes and len(outcomes) > 6
    assert assert_old_or_new(uri, old, new) == "new" and plain_ids(uri) == new
    assert sorted(os.listdir(uri)) == ["_manifest.json", "part-00000.parquet", "part-00001.parquet"]


def test_simulate_crashing_at_every_step_leaves_each_split_old_or_new(tmp_path, monkeypatch):
    out = str(tmp_path / "eyes")
    counts = {"synthetic": 3, "real": 2, "real_test": 2}

    def ids(split, seed):
        return {f"{split}-{seed}-{i:09d}" for i in range(counts[split])}

    for step in range(1, 100):
        simulate.simulate_dataset(out, *counts.values(), seed=1, rows_per_shard=2, parallel=False, overwrite=True)
        with monkeypatch.context() as m:
            crash_at(m, step)
            try:
                simulate.simulate_dataset(out, *counts.values(), seed=2, rows_per_shard=2, parallel=False,
                                          overwrite=True)
            except Crash:
                for split in counts:
                    assert_old_or_new(f"{out}/{split}", ids(split, 1), ids(split, 2))
                continue
        break
    assert step > 10
    for split in counts:
        assert plain_ids(f"{out}/{split}") == ids(split, 2)


def test_failed_ingest_overwrite_keeps_the_old_dataset(tmp_path, monkeypatch):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(src / f"{i}.png")
    out = str(tmp_path / "out")
    ingest_mod.ingest("folder", src, out, workers=1)
    old = load_numpy(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ingest_mod, "write_quarantine", broken)
    with pytest.raises(OSError, match="disk full"):
        ingest_mod.ingest("folder", src, out, workers=1, overwrite=True)
    np.testing.assert_array_equal(load_numpy(out)["image"], old["image"])
    assert [n for n in os.listdir(out) if n.startswith("_staging")] == []


# --- manifests are checked before they are trusted ---------------------------------------------------------


def rows(tag: str, n: int) -> dict[str, np.ndarray]:
    return LAYOUT.check_batch({"id": np.array([f"{tag}-{i}" for i in range(n)], dtype=object),
                               "image": np.zeros((n, 4, 4, 1), np.uint8),
                               "gaze": np.ones((n, 3), np.float32)}, "test")


@pytest.mark.parametrize("path,complaint", [
    ("../secret.parquet", "is not a shard name inside the dataset"),
    (None, "is not a shard name inside the dataset"),  # the secret's absolute path
    ("sub/part-00000.parquet", "is not a shard name inside the dataset"),
    ("part-00000.parquet", "is listed twice"),
])
def test_manifest_shard_paths_stay_inside_the_dataset(tmp_path, path, complaint):
    secret = tmp_path / "secret.parquet"
    secret.write_bytes(b"x" * 1234)
    uri = str(tmp_path / "ds")
    write(uri, "a", 2)
    manifest_file = tmp_path / "ds" / "_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    entry = dict(manifest["shards"][0], path=path or str(secret))
    manifest["shards"].append(entry)
    manifest["rows"] += entry["rows"]
    manifest_file.write_text(json.dumps(manifest))
    for read in (load_numpy, validate):
        with pytest.raises(DatasetError) as err:
            read(uri)
        assert str(err.value) == f"{manifest_file}: " + (
            f"shard {entry['path']!r} is listed twice" if "twice" in complaint else
            f"shard path {entry['path']!r} {complaint} (like part-00000.parquet)")
        assert "1234" not in str(err.value)


def test_duplicate_ids_across_shards_name_both(tmp_path):
    uri = str(tmp_path / "ds")
    shards = [write_shard(uri, 0, LAYOUT, rows("a", 2)), write_shard(uri, 1, LAYOUT, rows("b", 1)),
              write_shard(uri, 2, LAYOUT, rows("a", 2))]
    write_manifest(uri, make_manifest(LAYOUT, shards, kind="real", source="test"))
    message = rf"{uri}: id 'a-0' appears twice, in part-00000.parquet and in part-00002.parquet"
    for read in (load_numpy, validate, lambda u: validate(u, verify_checksums=True),
                 lambda u: load_numpy(u, columns=["image"])):
        with pytest.raises(DatasetError, match=message):
            read(uri)


def test_unlisted_shards_are_named_once(tmp_path, capsys):
    uri = str(tmp_path / "ds")
    write(uri, "a", 3)
    shutil.copy(tmp_path / "ds" / "part-00000.parquet", tmp_path / "ds" / "part-00007.parquet")
    assert len(load_numpy(uri)["id"]) == 3 and len(pd.read_parquet(uri)) == 5  # what the warning is about
    assert capsys.readouterr().err == (f"warning: {uri}: 1 file(s) not listed in its manifest, which plain Parquet "
                                       "readers would read as rows: part-00007.parquet\n")
    validate(uri)
    load_numpy(uri)
    assert capsys.readouterr().err == ""


# --- outputs never nest inside or around a dataset ---------------------------------------------------------


def test_refine_out_inside_or_above_the_input_is_refused(tmp_path, monkeypatch):
    import torch

    from simgan_dist.config import load_config
    from simgan_dist.core.models import build_discriminator, build_refiner
    from simgan_dist.refine import plan_job
    from simgan_dist.refine_shards import RefineError
    from simgan_dist.train.checkpoint import write_checkpoint

    cfg = load_config("tiny")
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "ckpt", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    simulate.simulate_dataset(str(tmp_path / "data"), 4, 0, 0, parallel=False)
    data = str(tmp_path / "data" / "synthetic")
    monkeypatch.chdir(tmp_path)
    for out in (data, "data/synthetic/", f"file://{data}", "data/./synthetic"):
        with pytest.raises(RefineError, match="is the input dataset itself"):
            plan_job(str(tmp_path / "ckpt"), data, out, cfg)
    for out in (f"{data}/refined", "data/synthetic/x/y", str(tmp_path / "data"), str(tmp_path)):
        with pytest.raises(RefineError, match=f"--out {out} is inside or above the input dataset {data}"):
            plan_job(str(tmp_path / "ckpt"), data, out, cfg)
    plan_job(str(tmp_path / "ckpt"), data, str(tmp_path / "data" / "refined"), cfg)  # beside it is fine
    assert sorted(os.listdir(tmp_path / "data")) == ["real", "real_test", "synthetic"]


def test_evaluate_out_inside_a_dataset_or_on_a_file_is_refused(tmp_path, capsys):
    from simgan_dist.evaluate import evaluate
    from simgan_dist.evaluate_inputs import EvaluationError

    data = {name: str(tmp_path / name) for name in ("synthetic", "refined", "real_test")}
    for name, uri in data.items():
        with pytest.raises(EvaluationError, match=rf"--out {uri}/report: is inside the --{name.replace('_', '-')} "
                                                  rf"dataset {uri}; choose a folder outside it"):
            evaluate(*data.values(), f"{uri}/report")
    (tmp_path / "metrics.json").write_text("{}")
    assert cli.main(["evaluate", "--synthetic", data["synthetic"], "--refined", data["refined"], "--real-test",
                     data["real_test"], "--out", str(tmp_path / "metrics.json"), "--no-ray"]) == 1
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'metrics.json'}: is a file; the report goes to a folder" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_overwrite_on_s3_leaves_only_the_new_dataset(s3_bucket):
    import pyarrow.fs as pafs

    uri = f"{s3_bucket}/ds"
    write(uri, "old", 5)
    with pytest.raises(DatasetError, match=f"{uri}: already holds a dataset"):
        write(uri, "new", 3)
    write(uri, "new", 3, overwrite=True)
    assert list(load_numpy(uri)["id"]) == ["new-0", "new-1", "new-2"]
    assert storage.list_files(uri) == ["_manifest.json", "part-00000.parquet", "part-00001.parquet"]
    assert storage.list_files(uri, file_type=pafs.FileType.Directory) == []
