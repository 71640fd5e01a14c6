"""How a training run's workers, Ray Data's read tasks and its history shard actors share a cluster.

`training_resources()` makes Ray Data's read tasks and the history buffer's shard actors part
of a training run's plan on any cluster and fails at once, naming what to change, when the run
cannot fit.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from simgan_dist.config import Config
from simgan_dist.console import say
from simgan_dist.errors import UserError

# A training run streams its corpora through Ray Data tasks that each hold one CPU; the
# workers must leave at least that much free or the read tasks never start.
DATA_CPUS = 1.0
# Below this a CPU worker shares a core with more than one other process and crawls.
MIN_WORKER_CPUS = 0.5
# What a worker keeps at least once the history shard actors' CPUs (distributed_history.SHARD_CPUS
# each: a few ms of copying per push or sample) and a Tune trial's sliver come out of its share.
MIN_WORKER_SHARE = 0.25
# How long an autoscaler request outlives the wait for it: long enough for the run's workers to
# land on the new nodes (busy nodes stay up without a request), short enough that a killed driver's
# request lapses.
REQUEST_GRACE_S = 600.0


def history_cpus(cfg: Config) -> float:
    """The CPUs a run's history shard actors hold (`distributed_history.SHARD_CPUS` each), beside its workers."""
    return cfg.train.buffer_shards * _shard_cpus()


def _shard_cpus() -> float:
    from simgan_dist.train.distributed_history import SHARD_CPUS  # imports Ray: not at this module's import

    return SHARD_CPUS


def _fits(cfg: Config, resources: dict[str, float], runs: int = 1, reserved_cpus: float = 0.0) -> bool:
    try:
        plan_workers(cfg, resources, runs, reserved_cpus)
        return True
    except UserError:
        return False


def plan_workers(cfg: Config, resources: dict[str, float], runs: int = 1,
                 reserved_cpus: float = 0.0) -> dict[str, float]:
    """Each training worker's resources on a cluster with `resources`, leaving Ray Data's CPUs free.

    A CPU worker holds up to one CPU, less when the cluster is small: at least MIN_WORKER_CPUS
    beside Ray Data's read tasks (2 workers on a 2-CPU node: half a CPU each, the read tasks the
    other). The run's history shard actors (`history_cpus`, SHARD_CPUS each) and `reserved_cpus`
    (what the process driving each run holds: a Tune trial's sliver) are taken from the workers'
    share, down to MIN_WORKER_SHARE each (2 workers on a 2-CPU node beside the tiny preset's 2
    shards: a quarter CPU each), so that everything the run starts fits: an actor left out of the
    plan would wait for a CPU the workers hold, and the run with it. `runs` runs share the
    cluster evenly (a sweep's concurrent trials). A run that cannot fit is a UserError that says
    what to change.
    """
    workers = cfg.train.num_workers
    history = history_cpus(cfg)
    cpus, gpus = resources.get("CPU", 0) / runs, resources.get("GPU", 0) / runs
    where = "the Ray cluster" if runs == 1 else f"each of {runs} concurrent runs' share of the Ray cluster"
    if cfg.train.use_gpu and gpus < workers:
        if resources.get("GPU", 0) < 1:
            raise UserError("train.use_gpu=true but the Ray cluster has no GPUs: set train.use_gpu=false, add GPU "
                            "nodes, or see the README's troubleshooting 'GPU not visible'")
        raise UserError(f"train.num_workers={workers} with train.use_gpu=true needs {workers} GPUs; {where} "
                        f"has {gpus:g}. Set train.num_workers={max(1, int(gpus))} or add GPU nodes (an autoscaling "
                        "cluster needs train.resource_wait_s to add them)")
    if (cpus - DATA_CPUS) / workers < MIN_WORKER_CPUS:
        most = int((cpus - DATA_CPUS) / MIN_WORKER_CPUS)
        raise UserError(
            f"train.num_workers={workers} needs at least {workers * MIN_WORKER_CPUS + DATA_CPUS:g} CPUs on {where} "
            f"({MIN_WORKER_CPUS:g} per worker plus {DATA_CPUS:g} for Ray Data's read tasks); it has "
            f"{cpus:g}. " + (f"Set train.num_workers={most} or fewer, or add CPUs" if most >= 1 else "Add CPUs"))
    share = (cpus - DATA_CPUS - history - reserved_cpus) / workers
    if share < MIN_WORKER_SHARE - 1e-9:  # (tolerance: 2 - 1 - 0.5 is exactly a quarter CPU for each of 2)
        most_shards = max(1, int((cpus - DATA_CPUS - workers * MIN_WORKER_SHARE - reserved_cpus) / _shard_cpus()))
        raise UserError(
            f"train.num_workers={workers} with train.buffer_shards={cfg.train.buffer_shards} needs at least "
            f"{workers * MIN_WORKER_SHARE + DATA_CPUS + history + reserved_cpus:g} CPUs on {where} "
            f"({MIN_WORKER_SHARE:g} per worker, {DATA_CPUS:g} for Ray Data's read tasks, {history:g} for the history "
            f"shard actors, {_shard_cpus():g} each" + (f", {reserved_cpus:g} for the run's driver" if reserved_cpus
                                                        else "")
            + f"); it has {cpus:g}. "
            + (f"Set train.buffer_shards={most_shards} or fewer, " if most_shards < cfg.train.buffer_shards else "")
            + "lower train.num_workers or add CPUs")
    # Rounded down to Ray's resource granularity (1e-4), so the shares never add up to more than there is.
    per_worker = math.floor(min(1.0, share) * 1e4 + 1e-6) / 1e4
    return {"CPU": per_worker, **({"GPU": 1.0} if cfg.train.use_gpu else {})}


# The requester id under which this process asked the autoscaler for resources
# (`training_resources`, the refine pool), until it withdraws the request (`clear_resource_request`).
_requested: str | None = None


def _autoscaling_coordinator():
    """Ray's cluster-wide AutoscalingCoordinator actor (detached, one per cluster).

    In Ray 2.60 every Ray Data and Ray Train run registers its requests with this actor, which
    merges them and re-sends the merged list to the autoscaler every 20 s: a direct
    `ray.autoscaler.sdk.request_resources` is overwritten within 20 s on any cluster that has ever
    run either. Its interface is Ray's own, not public API (Ray is pinned), hence this one lookup."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    return get_or_create_autoscaling_coordinator()


def request_beside_other_runs(bundles: list[dict[str, float]], expire_after_s: float) -> None:
    """Ask the autoscaler for `bundles` beside every other run's requests; the request lapses by
    itself after `expire_after_s` (a driver killed mid-wait leaves nothing behind for long)."""
    import ray

    global _requested
    _requested = _requested or f"simgan_dist-{uuid.uuid4().hex[:12]}"
    ray.get(_autoscaling_coordinator().request_resources.remote(
        requester_id=_requested, resources=bundles, expire_after_s=expire_after_s), timeout=60)


def clear_resource_request() -> None:
    """Withdraw this process's autoscaler request, if it made one, so the autoscaler does not keep
    the run's (GPU) nodes up after the run ends. `train.fit` and `tune.sweep` call it however they
    end. Only the process that asked withdraws: a Tune trial (`fit` with the sweep's plan) never
    clears the sweep's request while other trials still need it."""
    global _requested
    if _requested is None:
        return
    import ray

    if ray.is_initialized():
        ray.get(_autoscaling_coordinator().cancel_request.remote(_requested), timeout=60)
    _requested = None


def training_resources(cfg: Config, runs: int = 1, reserved_cpus: float = 0.0) -> dict[str, float]:
    """`plan_workers` on the connected cluster; waits up to train.resource_wait_s for an
    autoscaling cluster to add what the run (or `runs` runs) needs, instead of failing at once."""
    import ray

    resources = ray.cluster_resources()
    wait_s = cfg.train.resource_wait_s
    if not _fits(cfg, resources, runs, reserved_cpus) and wait_s > 0:
        bundle = {"CPU": 1.0, **({"GPU": 1.0} if cfg.train.use_gpu else {})}
        shards = [{"CPU": _shard_cpus()}] * cfg.train.buffer_shards
        request_beside_other_runs(([bundle] * cfg.train.num_workers + [{"CPU": DATA_CPUS}] + shards) * runs,
                 expire_after_s=wait_s + REQUEST_GRACE_S)
        say(f"ray: waiting up to {wait_s:g} s (train.resource_wait_s) for the cluster to add "
            + (f"{runs} x (" if runs > 1 else "") + f"{cfg.train.num_workers} x {bundle} + {DATA_CPUS:g} CPU"
            + f" + {history_cpus(cfg):g} CPU for history" + (")" if runs > 1 else ""))
        deadline = time.monotonic() + wait_s
        while not _fits(cfg, resources, runs, reserved_cpus) and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            resources = ray.cluster_resources()
    return plan_workers(cfg, resources, runs, reserved_cpus)


def describe(resources: dict[str, Any], cfg: Config) -> str:
    """A run's plan for the console: its workers, then what the plan keeps beside them."""
    workers = f"{cfg.train.num_workers} worker(s) x {', '.join(f'{v:g} {k}' for k, v in resources.items())}"
    return (f"{workers} (+{DATA_CPUS:g} CPU for Ray Data, {history_cpus(cfg):g} CPU for "
            f"{cfg.train.buffer_shards} history shard(s))")
