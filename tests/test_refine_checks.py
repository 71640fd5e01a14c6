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
from simgan_dist.refine_shards import BatchRefiner, RefineError, ShardIo, refine_shard
from simgan_dist.train.checkpoint import REFINER_FILE, CheckpointError, load_refiner, write_checkpoint


@pytest.fixture
def job(tmp_path):
    simulate_dataset(str(tmp_path / "data"), 60, 0, 0, seed=2, rows_per_shard=30, parallel=False)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "ckpt", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    return str(tmp_path / "data" / "synthetic"), checkpoint, cfg


def flip_a_bit(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_bit_flipped_input_shard_is_refused_as_it_is_read(job, tmp_path):
    data, checkpoint, cfg = job
    manifest = read_manifest(data)
    refiner, _ = load_refiner(str(checkpoint))
    io = ShardIo(str(tmp_path / "out"), manifest.layout, cfg.storage)
    tasks = plan_shards(data, manifest, 20)
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
