"""What refine reads is checked before it is used (issue 24 items 3, 4, 11), without Ray: an input
shard whose bytes differ from its manifest's sha256, a checkpoint with NaN weights or a truncated
refiner.pt, and a refiner whose output is not finite are each a clear error naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from simgan_dist.config import load_config
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.data import storage
from simgan_dist.data.schema import MANIFEST_NAME, DatasetError, read_manifest
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.refine import plan_job, plan_shards
from simgan_dist.refine_shards import BatchRefiner, RefineError, ShardIo, VerifiedInputs, refine_shard, verify_shard
from simgan_dist.train.checkpoint import REFINER_FILE, CheckpointError, load_refiner, write_checkpoint


@pytest.fixture
def job(tmp_path):
    simulate_dataset(str(tmp_path / "data"), 60, 0, 0, seed=2, rows_per_shard=30, parallel=False)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "ckpt", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    return str(tmp_path / "data" / "synthetic"), checkpoint, cfg


def refiner_and_io(job, tmp_path):
    """(the input manifest, the checkpoint's refiner, the shard I/O of a job writing to tmp_path/out)."""
    data, checkpoint, cfg = job
    manifest = read_manifest(data)
    return manifest, load_refiner(str(checkpoint))[0], ShardIo(str(tmp_path / "out"), manifest.layout, cfg.storage)


def flip_a_bit(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_bit_flipped_input_shard_is_refused_as_it_is_read(job, tmp_path):
    manifest, refiner, io = refiner_and_io(job, tmp_path)
    tasks = plan_shards(job[0], manifest, 20)
    refine_shard(tasks[0], io, BatchRefiner(refiner, 16))
    # the middle of the image column: the Parquet footer, size and row count all still agree
    shard = tmp_path / "data" / "synthetic" / manifest.shards[1].path
    flip_a_bit(shard, shard.stat().st_size // 2)
    bad = [t for t in tasks if t.input_uri.endswith(manifest.shards[1].path)]
    for task in bad:
        with pytest.raises(DatasetError, match=f"{shard}: .* sha256 does not match the input manifest"):
            refine_shard(task, io, BatchRefiner(refiner, 16))
        assert not (tmp_path / "out" / task.name).exists()


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file(job, tmp_path):
    data, checkpoint, cfg = job
    weights = torch.load(checkpoint / REFINER_FILE, weights_only=True)
    name = next(iter(weights))
    weights[name][0] = float("nan")
    torch.save(weights, checkpoint / REFINER_FILE)
    with pytest.raises(CheckpointError, match=f"{checkpoint}/refiner.pt: 1 tensor\\(s\\) hold NaN or infinity "
                                              f"\\(e.g. '{name}'\\)"):
        load_refiner(str(checkpoint))
    with pytest.raises(RefineError, match="checkpoint .* cannot be used: .*refiner.pt: 1 tensor"):
        plan_job(str(checkpoint), data, str(tmp_path / "out"), cfg)


def test_a_truncated_refiner_pt_is_a_clear_error(job, tmp_path):
    data, checkpoint, cfg = job
    whole = (checkpoint / REFINER_FILE).read_bytes()
    for cut in (100, len(whole) // 2, len(whole) - 10):  # a ValueError from torch past the first few bytes
        (checkpoint / REFINER_FILE).write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match="refiner.pt: not a readable checkpoint file"):
            load_refiner(str(checkpoint))
        with pytest.raises(RefineError, match="refiner.pt: not a readable checkpoint file"):
            plan_job(str(checkpoint), data, str(tmp_path / "out"), cfg)


def test_non_finite_refined_images_are_an_error_not_zeros(job, tmp_path):
    data, _, cfg = job
    manifest = read_manifest(data)
    refiner = build_refiner(cfg.model)
    with torch.no_grad():
        next(refiner.parameters()).fill_(float("inf"))
    io = ShardIo(str(tmp_path / "out"), manifest.layout, cfg.storage)
    task = plan_shards(data, manifest, 20)[0]
    with pytest.raises(RefineError, match="output holds NaN or infinity"):
        refine_shard(task, io, BatchRefiner(refiner, 16))
    assert not (tmp_path / "out").exists()


def test_the_manifest_records_that_inputs_were_checked(job):
    # plan_shards carries each input shard's size and sha256 to the actors that read it
    data, _, _ = job
    manifest = json.loads(storage.read_bytes(storage.join(data, MANIFEST_NAME)))
    tasks = plan_shards(data, read_manifest(data), 20)
    assert {(t.input_bytes, t.input_sha256) for t in tasks} == {(s["bytes"], s["sha256"]) for s in manifest["shards"]}


def test_an_input_shard_cut_into_several_tasks_is_read_and_verified_once(job, tmp_path):
    # 2 input shards of 30 rows, tasks of 10: each actor read and hashed the whole shard per task
    manifest, refiner, io = refiner_and_io(job, tmp_path)
    tasks = plan_shards(job[0], manifest, 10)
    inputs = VerifiedInputs(io)
    refine_shard(tasks[0], io, BatchRefiner(refiner, 16), inputs)
    # What was verified is what the shard's other tasks refine: damage on disk afterwards is not read...
    first = tmp_path / "data" / "synthetic" / manifest.shards[0].path
    flip_a_bit(first, first.stat().st_size // 2)
    for task in tasks[1:3]:
        refine_shard(task, io, BatchRefiner(refiner, 16), inputs)
        info, problem = verify_shard(task, io, checksum=False, inputs=inputs)
        assert info is not None, problem
    # ...but a shard not kept is read again and checked again.
    with pytest.raises(DatasetError, match="sha256 does not match"):
        refine_shard(tasks[0], io, BatchRefiner(refiner, 16), VerifiedInputs(io, keep_bytes=0))
    # A failed read is not kept: the shard is read again once it is sound.
    second = tmp_path / "data" / "synthetic" / manifest.shards[1].path
    sound = second.read_bytes()
    flip_a_bit(second, second.stat().st_size // 2)
    with pytest.raises(DatasetError, match="sha256 does not match"):
        refine_shard(tasks[3], io, BatchRefiner(refiner, 16), inputs)
    second.write_bytes(sound)
    refine_shard(tasks[3], io, BatchRefiner(refiner, 16), inputs)


def test_verified_inputs_keep_at_most_their_byte_budget(job, tmp_path):
    manifest, _, io = refiner_and_io(job, tmp_path)
    first, second = plan_shards(job[0], manifest, 30)
    inputs = VerifiedInputs(io, keep_bytes=max(s.bytes for s in manifest.shards))  # room for one shard
    inputs.rows(first, ["id"])
    inputs.rows(second, ["id"])
    for task in (first, second):
        path = tmp_path / "data" / "synthetic" / manifest.shards[task.index].path
        flip_a_bit(path, path.stat().st_size // 2)
    inputs.rows(second, ["id"])  # the newest is kept
    with pytest.raises(DatasetError, match="sha256 does not match"):
        inputs.rows(first, ["id"])  # the older one was let go, so it is read and checked again
