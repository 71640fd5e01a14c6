"""The DeepSpeed configuration the GPU runs: fp32 master weights, bf16 compute by autocast, the client
optimizer unwrapped, no host sync in a training step. Real engines in this process (gloo, world size 1);
bf16 autocast exists on the CPU too, so the GPU's code path runs here."""

import contextlib
import functools
import socket

import pytest
import torch
from toy_domains import toy_images

from simgan_dist.config import load_config
from simgan_dist.core.algorithm import Schedule, SimGAN
from simgan_dist.core.history import CodedHistory
from simgan_dist.core.imaging import to_model_input
from simgan_dist.core.losses import RefinerLoss
from simgan_dist.train.engines import DeepSpeedUpdater, build_engines, deepspeed_config
from simgan_dist.train.local import ArraySampler


@pytest.fixture(scope="module")
def process_group():
    """A one-process group: gloo on the CPU accelerator (DS_ACCELERATOR=cpu), nccl on a GPU (tests/gpu)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            env.setenv(key, value)
        deepspeed.init_distributed("nccl" if get_accelerator().device_name() == "cuda" else "gloo", verbose=False)
        yield torch.device(get_accelerator().device_name())
        dist.destroy_process_group()


def _cfg(*overrides):
    return load_config("tiny", overrides=["train.precision=bf16", "train.batch_size=8", "train.k_g=2",
                                          "train.pretrain_refiner_steps=1", "train.pretrain_disc_steps=1",
                                          *overrides])


def test_config_asks_for_autocast_not_bf16_weights():
    ds = deepspeed_config(_cfg(), bf16=True)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds  # either would make DeepSpeed hold low-precision weights
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 0
    assert deepspeed_config(_cfg(), bf16=False)["torch_autocast"]["enabled"] is False
    # DeepSpeed's throughput timer (on by default) synchronizes the device around every step
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert ds["wall_clock_breakdown"] is False


def _simgan(cfg, r_engine, d_engine, device=torch.device("cpu")):
    to_input = functools.partial(to_model_input, device=device)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return SimGAN(DeepSpeedUpdater(r_engine), DeepSpeedUpdater(d_engine), RefinerLoss(cfg.loss),
                  CodedHistory(64, (1, 35, 55), device=device),
                  Schedule(cfg.train.pretrain_refiner_steps, cfg.train.pretrain_disc_steps, 4, cfg.train.k_g, 1),
                  ArraySampler(toy_images(32, 0, real=False), cfg.train.batch_size, 1, to_input),
                  ArraySampler(toy_images(32, 1, real=True), cfg.train.batch_size, 2, to_input),
                  autocast)


@contextlib.contextmanager
def _host_syncs_raise():
    """Every tensor → Python value conversion raises: on a GPU each one would wait for the device."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("host sync in the training step")

    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.slow
def test_engines_keep_fp32_weights_an_unwrapped_optimizer_and_never_sync(process_group):
    cfg = _cfg()
    r_engine, d_engine = build_engines(cfg, torch.device("cpu"), bf16=True)
    for engine in (r_engine, d_engine):
        assert type(engine.optimizer) is torch.optim.Adam  # not DeepSpeed's per-parameter-.item() wrapper
        assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    algo = _simgan(cfg, r_engine, d_engine)
    with _host_syncs_raise():
        pytest.raises(AssertionError, torch.ones(1).item)  # the guard works
        metrics = [algo.advance() for _ in range(4)]  # pretrain R, pretrain D, two full iterations
    assert metrics[-1]["refiner/adv_loss"].dtype == torch.float32
    assert torch.isfinite(torch.stack([v.float() for m in metrics for v in m.values()])).all()


@pytest.mark.slow
def test_engines_run_no_throughput_or_wall_clock_timers(process_group, monkeypatch):
    """The engine DeepSpeed builds from our config: its throughput timer never starts and never
    synchronizes the accelerator during a step."""
    from deepspeed.accelerator import get_accelerator

    cfg = _cfg()
    r_engine, d_engine = build_engines(cfg, torch.device("cpu"), bf16=False)
    syncs = []
    monkeypatch.setattr(type(get_accelerator()), "synchronize", lambda self, *a, **k: syncs.append(1))
    for engine in (r_engine, d_engine):
        assert engine.tput_timer.config.enabled is False and engine.tput_timer.config.synchronized is False
        assert engine.wall_clock_breakdown() is False
    updater = DeepSpeedUpdater(r_engine)
    for _ in range(4):  # past the timer's start_step (2), where an enabled timer would synchronize
        updater.backward(updater.forward(torch.rand(8, 1, 35, 55) * 2 - 1).square().mean())
        updater.step()
    assert not r_engine.tput_timer.started and r_engine.tput_timer.global_step_count == 0
    assert syncs == []


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.slow
def test_zero_stages_train_d_after_an_r_step_under_bf16(process_group, stage):
    cfg = _cfg(f"train.zero_stage={stage}")
    r_engine, d_engine = build_engines(cfg, torch.device("cpu"), bf16=True)
    algo = _simgan(cfg, r_engine, d_engine)
    algo.advance()
    algo.advance()  # pretraining done: the next D step follows R steps through D's bare module
    before = [p.detach().clone() for p in d_engine.module.parameters()]
    r_before = [p.detach().clone() for p in r_engine.module.parameters()]
    algo.advance()
    assert all(not torch.equal(a, p) for a, p in zip(before, d_engine.module.parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(r_before, r_engine.module.parameters(), strict=True))


@pytest.mark.slow
def test_one_rank_skips_the_gradient_all_reduce_and_steps_as_plain_torch(process_group):
    import copy

    from simgan_dist.core.algorithm import make_optimizer

    cfg = _cfg()
    r_engine, _ = build_engines(cfg, torch.device("cpu"), bf16=False)
    assert r_engine.dp_world_size == 1 and not r_engine.enable_backward_allreduce
    reduced = []
    r_engine.allreduce_gradients = lambda *args, **kwargs: reduced.append(args)
    plain = copy.deepcopy(r_engine.module)
    plain_optimizer = make_optimizer(plain.parameters(), cfg.train, "refiner")
    x = torch.rand(8, 1, 35, 55) * 2 - 1
    updater = DeepSpeedUpdater(r_engine)
    updater.backward(updater.forward(x).square().mean())
    updater.step()
    plain(x).square().mean().backward()
    plain_optimizer.step()
    assert reduced == []
    for ours, theirs in zip(r_engine.module.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # ZeRO keeps its own reduction path (partitioned optimizer state needs it even at one rank)
    assert build_engines(_cfg("train.zero_stage=1"), torch.device("cpu"), bf16=False)[0].enable_backward_allreduce
