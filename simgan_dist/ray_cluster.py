"""Joining or starting Ray for every command, quiet consoles, and what a training run needs.

`connect()` does what `ray.init()` does about *where* (RAY_ADDRESS, else the cluster a
`ray start` on this machine registered, else a new local instance) but checks first that
the address answers, says which it chose, and never passes local-only arguments to a
cluster it joins. `training_resources()` makes Ray Data's read tasks and the history
buffer's shard actors part of a training run's plan on any cluster and fails at once, naming
what to change, when the run cannot fit.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simgan_dist.config import Config
from simgan_dist.errors import UserError

# A training run streams its corpora through Ray Data tasks that each hold one CPU; the
# workers must leave at least that much free or the read tasks never start.
DATA_CPUS = 1.0
# Below this a CPU worker shares a core with more than one other process and crawls.
MIN_WORKER_CPUS = 0.5
# What a worker keeps at least once the history shard actors' CPUs (distributed_history.SHARD_CPUS
# each: a few ms of copying per push or sample) and a Tune trial's sliver come out of its share.
MIN_WORKER_SHARE = 0.25
QUIET_RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")

_verbose = False


def configure_console(verbose: bool) -> None:
    """Set Ray's own console settings for this process and the processes it starts.

    Must run before Ray is imported: Ray reads these variables at import and at start-up.
    Quiet (the default): workers' output stays in Ray's log folder, the driver prints
    warnings and errors only, Ray Data logs to its file. Verbose: everything, undeduplicated.
    """
    global _verbose
    _verbose = verbose
    # Ray 2.60 turns token auth on for a new local instance anyway; saying so explicitly
    # keeps it on without the per-command warning that it was turned on.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if os.environ.get("RAY_DATA_LOGGING_CONFIG") == str(QUIET_RAY_DATA_LOGGING):
            del os.environ["RAY_DATA_LOGGING_CONFIG"]  # left by a quiet command earlier in this process
    else:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(QUIET_RAY_DATA_LOGGING))


def verbose() -> bool:
    """Whether the command was asked for framework output (`--verbose`)."""
    return _verbose


def say(line: str) -> None:
    """One of our own console lines (stdout, flushed: `ray job logs` shows it at once)."""
    print(line, flush=True)


@dataclass(frozen=True)
class Cluster:
    address: str | None  # None: a local instance this process started
    cpus: float
    gpus: float
    logs: str


def cluster_address() -> tuple[str | None, str]:
    """The address `ray.init()` would join and where it came from; (None, "") means start one."""
    from ray._common.utils import get_ray_address_file

    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        return (None, "") if address == "local" else (address, "RAY_ADDRESS")
    address_file = get_ray_address_file(None)
    if os.path.exists(address_file):
        with open(address_file) as f:
            return f.read().strip() or None, address_file
    return None, ""


def _check_answers(address: str, source: str) -> None:
    """A clear error instead of Ray's connection retries when nothing listens at `address`."""
    if address == "auto" or "://" in address:
        return  # Ray resolves these itself (ray:// is Ray Client)
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            return
    except (OSError, ValueError):
        pass
    if source == "RAY_ADDRESS":
        fix = ("start that cluster, correct RAY_ADDRESS (the GCS address HOST:6379, not the dashboard's "
               "http://HOST:8265), or unset it to start a local instance")
    else:
        fix = (f"it was registered by a `ray start` whose cluster has stopped without `ray stop`; run "
               f"`ray stop`, or delete {source}, to start a local instance instead")
    raise UserError(f"no Ray cluster answers at {address} (from {source}): {fix}")


def connect() -> Cluster:
    """Join the cluster Ray would join, or start a local instance; says which on the console."""
    import ray

    if ray.is_initialized():
        return _cluster(ray, "current")
    address, source = cluster_address()
    # Quiet: workers' output and Ray's INFO lines ("Started a local Ray instance", token setup)
    # stay in the log folder; errors Ray publishes to drivers (a worker died, OOM) still show.
    console = {"log_to_driver": _verbose, "logging_level": logging.INFO if _verbose else logging.WARNING}
    if address is None:
        # A run starts ~10 helper processes at once (train controller, data coordinators, buffer
        # shards); Ray's default limit of one starting process per CPU warns about that on a laptop.
        ray.init(address="local", _system_config={"worker_maximum_startup_concurrency": max(os.cpu_count() or 1, 4)},
                 **console)
    else:
        _check_answers(address, source)
        ray.init(**console)
    cluster = _cluster(ray, address)
    where = (f"joined the Ray cluster at {address} (from {source})" if address
             else "started a local Ray instance (no RAY_ADDRESS, no cluster registered on this machine)")
    say(f"ray: {where}: {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs; full logs in {cluster.logs}"
        + ("" if _verbose else " (--verbose shows them here)"))
    return cluster


def _cluster(ray, address: str | None) -> Cluster:
    resources = ray.cluster_resources()
    node = ray._private.worker.global_worker.node
    return Cluster(address, resources.get("CPU", 0.0), resources.get("GPU", 0.0),
                   node.get_logs_dir_path() if node else "")


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


def training_resources(cfg: Config, runs: int = 1, reserved_cpus: float = 0.0) -> dict[str, float]:
    """`plan_workers` on the connected cluster; waits up to train.resource_wait_s for an
    autoscaling cluster to add what the run (or `runs` runs) needs, instead of failing at once."""
    import ray

    resources = ray.cluster_resources()
    wait_s = cfg.train.resource_wait_s
    if not _fits(cfg, resources, runs, reserved_cpus) and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        bundle = {"CPU": 1.0, **({"GPU": 1.0} if cfg.train.use_gpu else {})}
        shards = [{"CPU": _shard_cpus()}] * cfg.train.buffer_shards
        request_resources(bundles=([bundle] * cfg.train.num_workers + [{"CPU": DATA_CPUS}] + shards) * runs)
        say(f"ray: waiting up to {wait_s:g} s (train.resource_wait_s) for the cluster to add "
            + (f"{runs} x (" if runs > 1 else "") + f"{cfg.train.num_workers} x {bundle} + {DATA_CPUS:g} CPU"
            + f" + {history_cpus(cfg):g} CPU for history" + (")" if runs > 1 else ""))
        deadline = time.monotonic() + wait_s
        while not _fits(cfg, resources, runs, reserved_cpus) and time.monotonic() < deadline:
            time.sleep(5)
            resources = ray.cluster_resources()
    return plan_workers(cfg, resources, runs, reserved_cpus)


def describe(resources: dict[str, Any], cfg: Config) -> str:
    """A run's plan for the console: its workers, then what the plan keeps beside them."""
    workers = f"{cfg.train.num_workers} worker(s) x {', '.join(f'{v:g} {k}' for k, v in resources.items())}"
    return (f"{workers} (+{DATA_CPUS:g} CPU for Ray Data, {history_cpus(cfg):g} CPU for "
            f"{cfg.train.buffer_shards} history shard(s))")


def failure_line(error: BaseException) -> str:
    """The line that says what went wrong: a Ray task error's last line (the exception), without colour codes."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def progress_printer(channel, done) -> None:
    """Print the lines rank 0 sends through `channel` (a ray.util.queue.Queue) until `done` is set."""
    from ray.util.queue import Empty

    while True:
        try:
            say(channel.get(timeout=1))
        except Empty:
            if done.is_set() and channel.empty():
                return


def remove_orphaned_placement_groups() -> list[dict[str, float]]:
    """Remove the placement groups whose creating actor is dead; returns their bundles' resources.

    Ray Train's controller creates its worker group's placement group. When Tune stops a trial
    early (ASHA), it kills the trial's process and with it the controller, before the
    controller removes the group; Ray keeps a group until its creator actor *and* job are gone,
    so it would hold its CPUs until the sweep ends. Ray Train's own detached cleaner asks the
    State API whether the controller lives, and never gets an answer without the dashboard, or
    with two Ray instances on one machine (it fails with "Found multiple active Ray
    instances"): a sweep on a small cluster then waits forever for CPUs nobody uses. Groups
    created by a driver (Tune's per-trial groups) have no creator actor and are left alone.
    """
    import ray
    from ray._private.state import state  # the GCS table holds the creator's liveness; the public one does not
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = gcs_pb2.PlacementGroupTableData
    freed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = table.FromString(raw)
        orphaned = (group.creator_actor_dead and not group.is_detached and group.state == table.CREATED
                    and group.creator_actor_id.strip(b"\xff\x00"))  # nil id: created by a driver
        if orphaned:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            held: dict[str, float] = {}
            for bundle in group.bundles:
                for name, amount in bundle.unit_resources.items():
                    held[name] = held.get(name, 0.0) + amount
            freed.append(held)
    return freed
