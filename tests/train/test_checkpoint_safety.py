"""Checkpoints are data, not code (issue 12, item 4): every file loads with weights_only=True,
and a file carrying a pickled payload is refused before anything in it runs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from toy_domains import toy_images

from simgan_dist.config import load_config
from simgan_dist.train.checkpoint import CheckpointError, load_data, load_refiner, rng_state, set_rng_state
from simgan_dist.train.local import train_local

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # toy_domains lives there


class Payload:
    """What an attacker with write access to the bucket would plant: unpickling runs a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker) -> None:
    torch.save({"algorithm": {"iterations_done": 1}, "evil": Payload(marker)}, path)


def test_rng_states_are_tensors_and_numbers_and_restore_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.normal()  # leaves a cached gaussian in the numpy state
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_data(tmp_path / "rng.pt", "rng.pt"))
    assert (random.random(), np.random.normal()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_local_checkpoint_loads_as_data_and_a_pickle_payload_is_refused(tmp_path):
    cfg = load_config("tiny", overrides=["train.iterations=2", "train.pretrain_refiner_steps=2",
                                         "train.pretrain_disc_steps=1", "train.report_every=100",
                                         "train.image_every=100", "train.checkpoint_every=100"])
    synthetic, real = toy_images(64, 0, real=False), toy_images(64, 1, real=True)
    run = train_local(cfg, tmp_path / "run", synthetic, real, progress=False)
    for name in ("state.pt", "refiner.pt", "discriminator.pt"):
        torch.load(run.checkpoint / name, weights_only=True)  # plain torch, no allow-list

    marker = tmp_path / "pwned"
    plant(run.checkpoint / "state.pt", marker)
    with pytest.raises(CheckpointError, match=r"state.pt: refusing to load: it holds pickled Python objects.*system"):
        train_local(cfg, tmp_path / "run", synthetic, real, progress=False)
    plant(run.checkpoint / "refiner.pt", marker)
    with pytest.raises(CheckpointError, match="refiner.pt: refusing to load"):
        load_refiner(str(run.checkpoint))
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_checkpoint_files_load_as_data_and_a_payload_is_refused(tmp_path):
    """The DeepSpeed engines train/engines.py builds read their own files through `load_data` too
    (ZeRO-2: model states and the optimizer partition with its loss scaler)."""
    script = textwrap.dedent(f"""
        import os, sys, torch, deepspeed, torch.distributed as dist
        sys.path[:0] = [{os.getcwd()!r}, {TESTS!r}]  # the package, and tests/ for toy_domains
        from test_checkpoint_safety import plant
        from simgan_dist.train.checkpoint import CheckpointError
        from simgan_dist.train.engines import load_as_data
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
        def engine():
            model = torch.nn.Linear(4, 2)
            e, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters()),
                config={{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {{"stage": 2}},
                         "steps_per_print": 1 << 30}})
            load_as_data(e)
            return e
        a = engine()
        a.backward(a(torch.randn(2, 4)).sum()); a.step()
        a.save_checkpoint({str(tmp_path)!r}, tag="t")
        b = engine()
        b.load_checkpoint({str(tmp_path)!r}, tag="t")
        assert all(torch.equal(x, y) for x, y in zip(a.module.parameters(), b.module.parameters()))
        plant({str(tmp_path / "t" / "mp_rank_00_model_states.pt")!r}, {str(tmp_path / "pwned")!r})
        try:
            engine().load_checkpoint({str(tmp_path)!r}, tag="t")
        except CheckpointError as exc:
            print("REFUSED", exc)
    """)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED DeepSpeed checkpoint file mp_rank_00_model_states.pt: refusing to load" in out.stdout
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(scope="module")
def eyes(tmp_path_factory):
    from simgan_dist.data.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("eyes")
    simulate_dataset(str(folder), synthetic=96, real=128, real_test=0, seed=4, rows_per_shard=64, parallel=False)
    return folder


def _scored_config(eyes, *overrides):
    """EMA of R and periodic evaluation with best-K checkpoints (the real validation rows held out)."""
    return load_config("tiny", overrides=[
        f"data.synthetic={eyes / 'synthetic'}", f"data.real={eyes / 'real'}", "data.real_val_fraction=0.2",
        "train.ema_decay=0.9", "train.eval_every=3", "train.eval_samples=32", "train.keep_best=2",
        "train.pretrain_refiner_steps=2", "train.pretrain_disc_steps=1", "train.report_every=100",
        "train.image_every=100", "train.checkpoint_every=100", *overrides])


def _data_only(folder) -> list[str]:
    """Every .pt file under `folder` but DeepSpeed's, each loaded by plain torch.load(weights_only=True)."""
    names = []
    for path in sorted(folder.rglob("*.pt")):
        if "deepspeed" not in path.parts:
            torch.load(path, weights_only=True)
            names.append(str(path.relative_to(folder)))
    return names


def test_ema_state_and_best_checkpoints_of_a_local_run_are_data(eyes, tmp_path):
    from simgan_dist.refine import choose_checkpoint

    run = train_local(_scored_config(eyes, "train.iterations=3"), tmp_path / "run", progress=False)
    loaded = _data_only(run.folder)
    assert "checkpoint/state.pt" in loaded and len([n for n in loaded if n.startswith("best/")]) == 4, loaded
    state = torch.load(run.checkpoint / "state.pt", weights_only=True)
    assert "refiner_training" in state  # R's raw weights beside the EMA in refiner.pt
    resumed = train_local(_scored_config(eyes, "train.iterations=5"), tmp_path / "run", progress=False)
    assert resumed.metrics and _data_only(run.folder)

    cfg = _scored_config(eyes)
    best = choose_checkpoint(str(run.folder), cfg)
    assert "/best/step_" in best
    load_refiner(best)
    marker = tmp_path / "pwned"
    plant(os.path.join(best, "refiner.pt"), marker)
    with pytest.raises(CheckpointError, match=r"refiner.pt: refusing to load"):
        load_refiner(choose_checkpoint(str(run.folder), cfg))
    assert not marker.exists()


def test_a_checkpoint_written_before_refiner_padding_existed_runs_with_zero_padding(tmp_path):
    """Those refiners were trained seeing zeros beyond the edge; reflect would change every output."""
    from simgan_dist.core.models import build_discriminator, build_refiner
    from simgan_dist.train.checkpoint import CONFIG_FILE, write_checkpoint

    cfg = load_config("tiny", overrides=["model.refiner_padding=zeros"])
    folder = write_checkpoint(tmp_path / "old", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    config_file = folder / CONFIG_FILE
    config_file.write_text("".join(line for line in config_file.read_text().splitlines(keepends=True)
                                   if "refiner_padding" not in line))
    refiner, loaded = load_refiner(str(folder))
    assert loaded.model.refiner_padding == "zeros"
    assert refiner.stem[0].padding_mode == "zeros"
    cfg.model.refiner_padding = "reflect"
    write_checkpoint(tmp_path / "new", cfg, build_refiner(cfg.model), build_discriminator(cfg.model))
    assert load_refiner(str(tmp_path / "new"))[0].stem[0].padding_mode == "reflect"
