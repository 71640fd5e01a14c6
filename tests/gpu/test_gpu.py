"""On one GPU: training past the first image grid and a checkpoint in bf16, a sync-free inner loop and
data stream, ZeRO-1/2 under bf16, torch.compile, 100K-row refinement, the hand refiner at its refine
batch size, gaze training with its images left on the host when the GPU has no room for them."""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pytest
import torch

from simgan_dist.config import load_config
from simgan_dist.core.imaging import to_model_input
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.data.render import LAYOUTS
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.refine import refine
from simgan_dist.refine_shards import BatchRefiner, refine_sizes
from simgan_dist.train.checkpoint import load_refiner, write_checkpoint
from simgan_dist.train.driver import checkpoint_uri, fit
from simgan_dist.train.engines import build_engines
from simgan_dist.train.worker import ShardStream
from tests.train.test_deepspeed_config import _cfg, _simgan, process_group  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def eye_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eyes")
    simulate_dataset(str(folder), synthetic=4096, real=2048, real_test=0, seed=3, rows_per_shard=1024)
    return folder


def test_one_worker_trains_past_the_image_grid_and_checkpoints_in_bf16(ray_local, eye_data, tmp_path):
    cfg = load_config("eye", overrides=[
        "train.use_gpu=true", "train.num_workers=1", "train.pretrain_refiner_steps=3", "train.pretrain_disc_steps=2",
        "train.iterations=10", "train.k_g=5", "train.report_every=5", "train.image_every=5",
        "train.checkpoint_every=10", "train.buffer_size=2048", f"data.synthetic={eye_data}/synthetic",
        f"data.real={eye_data}/real", f"train.storage_path={tmp_path}", "train.name=gpu"])
    result = fit(cfg)
    assert result.error is None, result.error
    assert result.metrics["step"] == 15
    grids = sorted((tmp_path / "gpu" / "monitor" / "images").glob("*.png"))
    assert len(grids) >= 3, "the preview grid (a device→host copy) was not written"
    refiner, saved = load_refiner(checkpoint_uri(cfg, result.checkpoint))
    assert all(p.dtype == torch.float32 for p in refiner.parameters())  # fp32 master weights saved
    metrics = [json.loads(line) for line in (tmp_path / "gpu" / "monitor" / "metrics.jsonl").read_text().splitlines()]
    print("images/s per report:", [round(m["images_per_s"]) for m in metrics])


def test_the_refiner_steps_never_wait_on_the_host(process_group):  # noqa: F811
    device = process_group
    cfg = _cfg("train.batch_size=512")
    r_engine, d_engine = build_engines(cfg, device, bf16=True, memory_format=torch.channels_last)
    assert type(r_engine.optimizer) is torch.optim.Adam and r_engine.optimizer.defaults["fused"]
    algo = _simgan(cfg, r_engine, d_engine, device)
    batch = torch.rand(512, 1, 35, 55, device=device) * 2 - 1
    algo.next_synthetic = lambda: batch  # data already on the device: the K_g inner loop alone
    algo.refiner_step()  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            algo.refiner_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_shard_stream_serves_device_batches_without_host_syncs():
    """The data side of the inner loop: chunk refills, the on-device shuffle (randperm), slicing."""
    from tests.train.test_train import _Shard

    class _DeviceShard(_Shard):  # what iter_torch_batches hands over on a GPU worker: device chunks
        def iter_torch_batches(self, batch_size: int, prefetch_batches: int):
            for start in range(0, len(self.on_device), batch_size):
                yield {"image": self.on_device[start:start + batch_size]}

    shard = _DeviceShard(16 * 512)
    shard.on_device = shard.images.expand(-1, 35, 55, 1).cuda()
    stream = ShardStream(shard, 512, to_input=functools.partial(to_model_input, device="cuda"), shuffle=True)
    stream()  # the first batch copies its preview to the host, once per run
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [stream() for _ in range(12)]  # crosses a chunk boundary (8 batches per chunk)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(b.shape == (512, 1, 35, 55) and b.is_cuda for b in batches)


@pytest.mark.parametrize("stage", [1, 2])
def test_d_learns_after_an_r_step_under_bf16_and_zero(process_group, stage):  # noqa: F811
    device = process_group
    cfg = _cfg(f"train.zero_stage={stage}", "train.batch_size=64")
    r_engine, d_engine = build_engines(cfg, device, bf16=True)
    algo = _simgan(cfg, r_engine, d_engine, device)
    algo.advance()
    algo.advance()
    before = [p.detach().clone() for p in d_engine.module.parameters()]
    algo.advance()  # K_g R steps through D's bare module, then D's step
    assert all(not torch.equal(a, p) for a, p in zip(before, d_engine.module.parameters(), strict=True))


def test_compiled_engines_train(process_group):  # noqa: F811
    device = process_group
    cfg = _cfg("train.compile=true", "train.batch_size=64")
    r_engine, d_engine = build_engines(cfg, device, bf16=True)
    assert r_engine.is_compiled and d_engine.is_compiled
    algo = _simgan(cfg, r_engine, d_engine, device)
    metrics = [algo.advance() for _ in range(4)]
    assert torch.isfinite(torch.stack([v.float() for m in metrics for v in m.values()])).all()
    assert "_orig_mod" not in "".join(r_engine.module.state_dict())  # checkpoints keep their keys


def test_refine_100k_eye_rows(ray_local, tmp_path):
    rows = 100_000
    simulate_dataset(str(tmp_path / "data"), synthetic=rows, real=0, real_test=0, seed=0, rows_per_shard=25_000)
    cfg = load_config("eye", overrides=["refine.num_gpus=1", "refine.max_actors=1"])
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "ckpt", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    start = time.perf_counter()
    manifest = refine(str(checkpoint), str(tmp_path / "data" / "synthetic"), str(tmp_path / "refined"), cfg,
                      progress=False)
    record = manifest.extra["refine"]
    assert manifest.rows == rows and record["exactness"]["verified"] and record["precision"] == "bf16"
    print(f"refine 100K eye rows: {rows / (time.perf_counter() - start):,.0f} images/s wall, "
          f"{record.get('steady_images_per_s')} steady, batch {record['batch_size']}")


def test_hand_refiner_fits_at_its_refine_batch_size():
    cfg = load_config("hand", overrides=["refine.num_gpus=1"])
    batch, _ = refine_sizes(cfg.model, LAYOUTS["hand"], cfg.refine)
    refiner = BatchRefiner(build_refiner(cfg.model), batch, device="cuda", depth=True)
    depth = np.random.default_rng(0).integers(700, 1100, (batch, 224, 224, 1)).astype(np.uint16)
    torch.cuda.reset_peak_memory_stats()
    out = refiner(depth)
    peak = torch.cuda.max_memory_allocated()
    assert out.shape == depth.shape and out.dtype == np.uint16
    assert peak < 2 * cfg.refine.batch_memory_gb * 2**30, f"{peak / 2**30:.1f} GiB at batch {batch}"
    print(f"hand refine batch {batch}: peak {peak / 2**30:.2f} GiB")


def test_gaze_training_on_a_gpu_without_room_for_its_images_keeps_them_on_the_host(monkeypatch):
    from simgan_dist.config import EvaluateConfig
    from simgan_dist.metrics import estimators as gaze

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4096, 35, 55, 1), dtype=np.uint8)
    labels = rng.normal(size=(4096, 3)).astype(np.float32)
    recipe = EvaluateConfig(gaze_model="small", gaze_epochs=2, gaze_batch_size=256, gaze_val_fraction=0.1)
    resident, _ = gaze.fit_estimator(images, labels, recipe, seed=0, progress=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (images.nbytes, 80 * 2**30))  # no room for 2 copies
    on_host, info = gaze.fit_estimator(images, labels, recipe, seed=0, progress=False)
    assert info["device"].startswith("cuda")
    a, b = gaze.run_model(resident, images[:512]), gaze.run_model(on_host, images[:512])
    assert gaze.angular_error_deg(a, b).mean() < 2.0  # the same training (up to GPU nondeterminism)
