"""Defects a first run on a real (multi-node, autoscaling) cluster would hit, each with its CPU test."""

from __future__ import annotations

import json
import time

import pytest

from simgan_dist.config import load_config
from simgan_dist.errors import UserError


def _autoscaler_request() -> list[dict]:
    """The resource request the autoscaler reads, as `ray.autoscaler.sdk.request_resources` wrote it
    (Ray's AutoscalingCoordinator calls it with every requester's bundles): the GCS's internal KV
    (autoscaler v1, what a local instance runs) or the GCS's cluster
    constraint (v2)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray._private.worker import global_worker
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(global_worker.gcs_client.address)
        return [dict(b.bundle) for d in status.resource_demands.cluster_constraint_demand
                for b in d.bundles_by_count for _ in range(b.count)]
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def _autoscaler_request_once(settled, timeout_s: float = 20.0) -> list[dict]:
    """The request once `settled(request)` holds: the GCS's view lags `request_resources` a little."""
    deadline = time.monotonic() + timeout_s
    while not settled(request := _autoscaler_request()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return request


@pytest.mark.slow
def test_a_run_withdraws_its_autoscaler_request_when_it_ends(ray_local):
    """A run that asked for GPU nodes and ended (here: failed, the nodes never came) must leave no
    request behind, or the autoscaler keeps GPU nodes up; while it waits, its request must survive
    other runs' requests: Ray Data and Ray Train re-send their merged requests through Ray's
    AutoscalingCoordinator, which overwrote a direct `request_resources` (a full test run caught
    that). Checked at the source the autoscaler reads (the GCS), which is all our code controls."""
    import ray

    from simgan_dist.train import driver, resources

    # No GPUs on the test instance: the run asks the autoscaler for them, waits, then fails.
    cfg = load_config("tiny", overrides=["train.use_gpu=true", "train.resource_wait_s=0.1"])
    with pytest.raises(UserError):
        resources.training_resources(cfg)
    gpus = lambda request: sum(bundle.get("GPU", 0) for bundle in request)  # noqa: E731
    assert gpus(_autoscaler_request_once(lambda request: gpus(request) > 0)) == cfg.train.num_workers

    # Another run's request arrives, as a Ray Data pipeline sends it: ours is kept beside it.
    coordinator = resources._autoscaling_coordinator()
    ray.get(coordinator.request_resources.remote(requester_id="a-ray-data-run", resources=[{"CPU": 3.0}],
                                                 expire_after_s=60))
    try:
        request = _autoscaler_request_once(lambda request: {"CPU": 3.0} in request)
        assert {"CPU": 3.0} in request and gpus(request) == cfg.train.num_workers
    finally:
        ray.get(coordinator.cancel_request.remote("a-ray-data-run"))

    with pytest.raises(UserError):
        driver.fit(cfg)
    assert gpus(_autoscaler_request_once(lambda request: gpus(request) == 0)) == 0  # seen > 0 first: withdrawn
    assert resources._requested is None
    resources.clear_resource_request()  # nothing asked: a no-op (a Tune trial never clears the sweep's request)


@pytest.mark.parametrize("visible, current", [(0, None), (1, 0), (2, 1), (8, 5)])
def test_cuda_rng_states_saved_on_4_gpus_restore_where_fewer_or_more_are_visible(tmp_path, monkeypatch,
                                                                                   visible, current):
    """A checkpoint saved by a rank on cuda:2 of a 4-GPU node resumes on a node with `visible` GPUs
    (0: none, torch.cuda unavailable) without IndexError; the rank's current device continues the
    generator it drew from."""
    import torch

    from simgan_dist.train.checkpoint import load_data, rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    state["cuda_device"] = 2
    torch.save(state, tmp_path / "rng_rank0.pt")
    saved = load_data(str(tmp_path / "rng_rank0.pt"), "rng")
    generators: dict[int, int] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: generators.__setitem__(device, int(s[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("indexes past the visible devices"))
    set_rng_state(saved)
    if not visible:
        assert generators == {}
        return
    expected = {i: i for i in range(min(visible, 4))}
    expected[current] = 2
    assert generators == expected
    del saved["cuda_device"]  # a checkpoint from before the current device was saved
    generators.clear()
    set_rng_state(saved)
    assert generators == {i: i for i in range(min(visible, 4))}


def test_a_sweep_restarts_trials_whose_process_was_lost(tmp_path, monkeypatch):
    """The sweep's RunConfig restarts a lost trial (its node preempted) as often as a run restarts its
    workers; without a failure_config, Tune's default (0) ends the trial at the first lost node."""
    from simgan_dist import tune as sweep_module

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # make_tuner sets it without --verbose
    cfg = load_config("tiny", overrides=["train.eval_every=2", "train.max_failures=3", "tune.grace_steps=10",
                                         f"tune.output={tmp_path}",
                                         "data.synthetic=s3://bucket/synthetic", "data.real=s3://bucket/real"])
    tuner = sweep_module.make_tuner(cfg, 1, {"CPU": 0.5})
    run_config = tuner._local_tuner.get_run_config()
    assert run_config.failure_config.max_failures == 3
    assert sweep_module.trial_failure_config(cfg).max_failures == 3


@pytest.mark.parametrize("assigned, cuda, expected", [([], True, "cpu"), ([], False, "cpu"), ([0], True, "cuda"),
                                                      ([3], False, "cpu")])
def test_a_refine_actor_takes_its_device_and_precision_from_the_gpus_ray_assigned(monkeypatch, assigned, cuda,
                                                                                  expected):
    """A CPU actor on a GPU node (torch sees the node's GPUs) refines on the CPU in fp32, as the
    manifest says; an actor with a GPU assigned uses it."""
    import torch

    from simgan_dist.core.models import build_refiner
    from simgan_dist.refine_shards import BatchRefiner, actor_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    device = actor_device(assigned)
    assert device.type == expected
    if expected == "cpu":
        refiner = BatchRefiner(build_refiner(load_config("tiny").model), 4, device=device)
        assert refiner.dtype == torch.float32 and not refiner.channels_last


def test_fitting_a_gaze_net_leaves_cudnn_benchmark_as_it_was(monkeypatch):
    """`cudnn.benchmark` is on only while a gaze network trains, not for the rest of the process
    (a training worker that built the realism network first)."""
    import numpy as np
    import torch

    from simgan_dist.config import EvaluateConfig
    from simgan_dist.metrics.estimators import fit_estimator

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 35, 55, 1), dtype=np.uint8)
    gaze = rng.normal(size=(16, 3)).astype(np.float32)
    recipe = EvaluateConfig(gaze_model="small", gaze_epochs=1, gaze_batch_size=8, gaze_val_fraction=0.0,
                            gaze_patience=0)
    for before in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", before)
        fit_estimator(images, gaze, recipe, seed=0, progress=False)
        assert torch.backends.cudnn.benchmark is before


@pytest.mark.parametrize("free_gib, expected", [(80, "cuda"), (10, "cuda"), (4, "cpu"), (0.5, "cpu")])
def test_gaze_training_keeps_its_images_on_the_gpu_only_when_they_fit(free_gib, expected):
    """evaluate's gaze tasks (and the realism network) put the whole training set on their GPU: on
    a GPU with less free memory than twice the images (plus headroom) they stay on the host and
    each batch is copied over, instead of an out-of-memory error. 3 GiB of images here."""
    import torch

    from simgan_dist.metrics.estimators import data_device

    gpu = torch.device("cuda", 0)
    assert data_device(3 * 2**30, gpu, free_bytes=int(free_gib * 2**30)).type == expected
    assert data_device(3 * 2**30, gpu, copies=1, free_bytes=4 * 2**30) == gpu  # one copy to predict
    assert data_device(3 * 2**30, torch.device("cpu"), free_bytes=0).type == "cpu"


@pytest.mark.parametrize("use_gpu, inherited, expected", [(True, "cpu", None), (True, "cuda", "cuda"),
                                                          (False, None, "cpu"), (False, "cpu", "cpu")])
def test_gpu_workers_drop_an_inherited_cpu_deepspeed_accelerator(use_gpu, inherited, expected):
    from simgan_dist.train.worker import deepspeed_accelerator_env

    environ = {} if inherited is None else {"DS_ACCELERATOR": inherited}
    deepspeed_accelerator_env(use_gpu, environ)
    assert environ.get("DS_ACCELERATOR") == expected


def test_rank_0_builds_its_evaluator_before_the_first_collective():
    """Built after the engines (DeepSpeed's broadcast) and the restore barrier, the evaluator kept the
    other ranks waiting inside the first gradient all-reduce. A source check: the loop itself
    needs a Ray Train worker group."""
    import inspect

    from simgan_dist.train import worker

    source = inspect.getsource(worker.train_loop_per_worker)
    built = source.index("Evaluator.from_config(cfg)")
    assert built < source.index("build_engines(") < source.index("dist.barrier()")
