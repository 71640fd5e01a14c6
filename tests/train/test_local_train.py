import json

import torch
from PIL import Image
from toy_domains import toy_images

from simgan_dist.config import load_config
from simgan_dist.train.checkpoint import STATE_FILE, load_refiner
from simgan_dist.train.local import train_local


def test_local_run_writes_grid_metrics_checkpoint_and_resumes(tmp_path):
    cfg = load_config("tiny", overrides=["train.iterations=6", "train.pretrain_refiner_steps=4",
                                         "train.pretrain_disc_steps=2", "train.checkpoint_every=6",
                                         "train.report_every=4", "train.image_every=12"])
    synthetic, real = toy_images(96, 0, real=False), toy_images(96, 1, real=True)
    run = train_local(cfg, tmp_path / "run", synthetic, real, progress=False)
    grids = sorted((tmp_path / "run" / "images").glob("*.png"))
    assert grids, "no synthetic | refined | real grid written"
    assert Image.open(grids[-1]).size[1] > 3 * 35  # three rows
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 12 and "refiner/adv_loss" in lines[-1] and "disc/acc_real" in lines[-1]
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    refiner, loaded_cfg = load_refiner(str(run.checkpoint))
    assert loaded_cfg == cfg
    weights = {k: v.clone() for k, v in refiner.state_dict().items()}

    # a longer schedule resumes from the checkpoint instead of starting over
    longer = load_config("tiny", overrides=["train.iterations=8", "train.pretrain_refiner_steps=4",
                                            "train.pretrain_disc_steps=2", "train.report_every=2"])
    train_local(longer, tmp_path / "run", synthetic, real, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines][-2:] == [12, 14]
    resumed, _ = load_refiner(str(run.checkpoint))
    assert any(not torch.equal(weights[k], v) for k, v in resumed.state_dict().items())


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    """train.deterministic (the tiny preset's): stopped halfway and resumed equals straight through, exactly;
    and the process's torch settings are the caller's again afterwards."""
    assert not torch.are_deterministic_algorithms_enabled()
    overrides = ["train.pretrain_refiner_steps=3", "train.pretrain_disc_steps=2", "train.report_every=100",
                 "train.image_every=100"]
    synthetic, real = toy_images(96, 0, real=False), toy_images(96, 1, real=True)
    straight = load_config("tiny", overrides=[*overrides, "train.iterations=4", "train.checkpoint_every=100"])
    train_local(straight, tmp_path / "a", synthetic, real, progress=False)
    half = load_config("tiny", overrides=[*overrides, "train.iterations=2", "train.checkpoint_every=100"])
    train_local(half, tmp_path / "b", synthetic, real, progress=False)
    train_local(straight, tmp_path / "b", synthetic, real, progress=False)
    a, _ = load_refiner(str(tmp_path / "a" / "checkpoint"))
    b, _ = load_refiner(str(tmp_path / "b" / "checkpoint"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.are_deterministic_algorithms_enabled()


def test_ema_checkpoint_holds_the_average_and_resumes(tmp_path):
    overrides = ["train.pretrain_refiner_steps=3", "train.pretrain_disc_steps=2", "train.report_every=100",
                 "train.image_every=100", "train.checkpoint_every=100", "train.ema_decay=0.9",
                 "train.betas=[0.5, 0.999]", "loss.reg_reduction=mean", "loss.lambda_reg=1.0"]
    synthetic, real = toy_images(96, 0, real=False), toy_images(96, 1, real=True)
    cfg = load_config("tiny", overrides=[*overrides, "train.iterations=3"])
    train_local(cfg, tmp_path / "run", synthetic, real, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint" / STATE_FILE, weights_only=True)
    average, _ = load_refiner(str(tmp_path / "run" / "checkpoint"))
    # refiner.pt (what refine loads) is the EMA, not the last weights of R
    assert any(not torch.equal(state["refiner_training"][k], v) for k, v in average.state_dict().items())
    longer = load_config("tiny", overrides=[*overrides, "train.iterations=5"])
    train_local(longer, tmp_path / "run", synthetic, real, progress=False)
    straight = load_config("tiny", overrides=[*overrides, "train.iterations=5"])
    train_local(straight, tmp_path / "straight", synthetic, real, progress=False)
    a, _ = load_refiner(str(tmp_path / "run" / "checkpoint"))
    b, _ = load_refiner(str(tmp_path / "straight" / "checkpoint"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name


def test_deterministic_kernels_leave_new_tensors_unfilled_and_put_every_setting_back():
    """torch's deterministic mode NaN-fills each torch.empty by default: DeepSpeed's per-step buckets then
    made a 2-worker ZeRO-2 step take seconds (bench/RESULTS.md issue 23, 4.). Reproducible bits do not need it."""
    import torch

    from simgan_dist.config import load_config
    from simgan_dist.train.recipe import deterministic_kernels

    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    with deterministic_kernels(load_config("tiny", overrides=["train.deterministic=true"]).train):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before
