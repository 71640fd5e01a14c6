import functools

import numpy as np
import pytest
import torch
from toy_domains import toy_images

from simgan_dist.config import load_config
from simgan_dist.core.algorithm import EmaWeights, Schedule, SimGAN, TorchUpdater, make_optimizer
from simgan_dist.core.history import HistoryBuffer
from simgan_dist.core.imaging import to_model_input, to_storage
from simgan_dist.core.losses import RefinerLoss
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.train.local import ArraySampler


class CountingUpdater(TorchUpdater):
    def __init__(self, module, optimizer):
        super().__init__(module, optimizer)
        self.steps = 0
        self.grads_at_step: list[dict[str, torch.Tensor | None]] = []

    def step(self):
        self.steps += 1
        self.grads_at_step.append({n: p.grad for n, p in self.module.named_parameters()})
        super().step()


def make_simgan(schedule=Schedule(2, 2, 3, k_g=2, k_d=1), lambda_reg=1e-4, batch=8):
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=[f"loss.lambda_reg={lambda_reg}"])
    refiner, disc = build_refiner(cfg.model), build_discriminator(cfg.model)
    r = CountingUpdater(refiner, torch.optim.Adam(refiner.parameters(), lr=1e-3))
    d = CountingUpdater(disc, torch.optim.Adam(disc.parameters(), lr=1e-3))
    history = HistoryBuffer(64, (1, 35, 55))
    syn = ArraySampler(toy_images(64, 0, real=False), batch, 1, to_model_input)
    real = ArraySampler(toy_images(64, 1, real=True), batch, 2, to_model_input)
    return SimGAN(r, d, RefinerLoss(cfg.loss), history, schedule, syn, real), r, d, history


def test_refiner_receives_adversarial_gradient_and_disc_none():
    algo, r, d, _ = make_simgan(lambda_reg=0.0)
    algo.disc_step()
    algo.refiner_step()
    grads = r.grads_at_step[-1]
    assert all(g is not None for g in grads.values())
    assert sum(g.abs().sum().item() for g in grads.values()) > 0  # λ=0: purely adversarial
    assert all(p.grad is None for p in d.module.parameters())
    assert all(p.requires_grad for p in d.module.parameters())  # unfrozen afterwards


def test_disc_step_leaves_refiner_without_gradient():
    algo, r, d, _ = make_simgan()
    algo.disc_step()
    assert all(p.grad is None for p in r.module.parameters())
    assert all(g is not None for g in d.grads_at_step[-1].values())


def test_pretraining_uses_self_regularization_only():
    algo, r, d, _ = make_simgan()
    metrics = algo.advance()
    assert set(metrics) == {"refiner/reg_loss"}
    assert d.steps == 0 and r.steps == 1
    assert all(p.grad is None for p in d.module.parameters())


def test_schedule_honours_pretraining_and_k_g_k_d():
    schedule = Schedule(pretrain_refiner_steps=3, pretrain_disc_steps=2, iterations=4, k_g=3, k_d=2)
    algo, r, d, history = make_simgan(schedule)
    phases = []
    while not algo.done:
        phases.append(algo.phase)
        algo.advance()
    assert phases == ["pretrain_refiner"] * 3 + ["pretrain_disc"] * 2 + ["adversarial"] * 4
    assert r.steps == 3 + 4 * 3
    assert d.steps == 2 + 4 * 2
    # every D step pushed b/2 = 4 refined images; 10 D steps fill 40 of 64 slots
    assert len(history) == 40
    with pytest.raises(RuntimeError):
        algo.advance()


def test_disc_batch_is_half_current_half_history():
    algo, r, d, history = make_simgan(batch=8)
    seen = []
    d.forward = lambda x: seen.append(x.shape[0]) or d.module(x)
    algo.disc_step()  # empty history: real 8 + current 4
    algo.disc_step()  # real 8 + current 4 + history 4
    assert seen == [12, 16]


def test_state_dict_round_trip():
    algo, *_ = make_simgan()
    algo.advance()
    algo.advance()
    other, *_ = make_simgan()
    other.load_state_dict(algo.state_dict())
    assert other.phase == "pretrain_disc" and other.global_step == 2


def test_toy_run_moves_refined_images_towards_real():
    cfg = load_config("tiny", overrides=["train.batch_size=32", "train.lr=3e-3", "loss.lambda_reg=1e-5",
                                         "train.k_g=2", "train.iterations=150"])
    torch.manual_seed(0)
    synthetic, real = toy_images(512, 0, real=False), toy_images(512, 1, real=True)
    refiner, disc = build_refiner(cfg.model), build_discriminator(cfg.model)
    to_input = functools.partial(to_model_input)
    algo = SimGAN(
        TorchUpdater(refiner, torch.optim.Adam(refiner.parameters(), lr=cfg.train.lr)),
        TorchUpdater(disc, torch.optim.Adam(disc.parameters(), lr=cfg.train.lr)),
        RefinerLoss(cfg.loss), HistoryBuffer(cfg.train.buffer_size, (1, 35, 55)),
        Schedule(cfg.train.pretrain_refiner_steps, cfg.train.pretrain_disc_steps, cfg.train.iterations,
                 cfg.train.k_g, cfg.train.k_d),
        ArraySampler(synthetic, 32, 1, to_input), ArraySampler(real, 32, 2, to_input),
    )
    test = toy_images(256, 7, real=False)
    with torch.no_grad():
        before = to_storage(refiner(to_model_input(test))).astype(np.float64).mean()
    while not algo.done:
        algo.advance()
    with torch.no_grad():
        after = to_storage(refiner(to_model_input(test))).astype(np.float64).mean()
    real_mean, syn_mean = real.mean(), test.mean()
    # pretraining keeps R near identity; adversarial training pulls the mean towards real
    assert abs(before - syn_mean) < 0.25 * abs(syn_mean - real_mean)
    assert abs(after - real_mean) < 0.5 * abs(syn_mean - real_mean), (syn_mean, after, real_mean)


def test_make_optimizer_reads_kind_betas_and_separate_learning_rates():
    train = load_config("tiny", overrides=["train.lr=2e-4", "train.lr_disc=1e-3", "train.betas=[0.5, 0.99]"]).train
    params = [torch.nn.Parameter(torch.zeros(2))]
    r, d = make_optimizer(params, train, "refiner"), make_optimizer(params, train, "disc")
    assert isinstance(r, torch.optim.Adam) and r.defaults["lr"] == 2e-4 and r.defaults["betas"] == (0.5, 0.99)
    assert d.defaults["lr"] == 1e-3
    same = load_config("tiny", overrides=["train.lr=2e-4"]).train  # lr_disc 0: D uses lr
    assert make_optimizer(params, same, "disc").defaults["lr"] == 2e-4
    sgd = make_optimizer(params, load_config("tiny", overrides=["train.optimizer=sgd"]).train, "refiner")
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    # fused on the CPU too: the step counter stays a tensor, a step never calls .item()
    assert r.defaults["fused"] and sgd.defaults["fused"]
    params[0].grad = torch.ones(2)
    r.step()
    sgd.step()
    with pytest.raises(ValueError, match="role"):
        make_optimizer(params, train, "generator")


def test_ema_copies_r_in_pretraining_then_averages():
    algo, r, _, _ = make_simgan(Schedule(2, 1, 2, k_g=1, k_d=1))
    algo.ema = EmaWeights(r.module, decay=0.5)
    algo.advance()
    for average, current in zip(algo.ema.module.parameters(), r.module.parameters(), strict=True):
        assert torch.equal(average, current)  # an exact copy while R learns the identity
    while algo.phase != "adversarial":
        algo.advance()
    before = [p.clone() for p in algo.ema.module.parameters()]
    algo.advance()  # one R step: average = (before + R) / 2
    for old, average, current in zip(before, algo.ema.module.parameters(), r.module.parameters(), strict=True):
        torch.testing.assert_close(average, (old + current) / 2)
    assert not any(p.requires_grad for p in algo.ema.module.parameters())


def test_disc_instance_noise_fades_over_the_iterations_unless_told_to_stay():
    algo, *_ = make_simgan(Schedule(0, 0, 4, k_g=1, k_d=1))
    algo.disc_noise = 0.2
    x = torch.zeros(512, 1, 35, 55)
    assert algo._noisy(x).std().item() == pytest.approx(0.2, rel=0.05)
    algo.iterations_done = 3
    assert algo._noisy(x).std().item() == pytest.approx(0.05, rel=0.05)
    algo.disc_noise_fade = False  # kept: D never sees the fine texture R would otherwise fake
    assert algo._noisy(x).std().item() == pytest.approx(0.2, rel=0.05)
    algo.disc_noise = 0.0
    assert algo._noisy(x) is x


def test_ema_of_a_module_compiled_in_place_is_not_the_module_itself():
    module = torch.nn.Linear(2, 2)
    module.compile()  # lazy: nothing is compiled until a call
    ema = EmaWeights(module, decay=0.5)
    with torch.no_grad():
        module.weight.add_(1.0)
    x = torch.ones(1, 2)
    assert not torch.equal(ema.module(x), module.forward(x))  # the copy runs its own (EMA) weights
