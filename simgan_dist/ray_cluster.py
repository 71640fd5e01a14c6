"""Joining or starting Ray for every command, and clearing what a stopped run left behind.

`connect()` does what `ray.init()` does about *where* (RAY_ADDRESS, else the cluster a
`ray start` on this machine registered, else a new local instance) but checks first that
the address answers, says which it chose, and never passes local-only arguments to a
cluster it joins. `training_resources()` makes Ray Data's read tasks and the history
buffer's shard actors part of a training run's plan on any cluster and fails at once, naming
what to change, when the run cannot fit.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass

from simgan_dist.console import say, verbose
from simgan_dist.errors import UserError


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
    quiet = not verbose()
    console = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else logging.INFO}
    if address is None:
        # A run starts ~10 helper processes at once (train controller, data coordinators, buffer
        # shards); Ray's default limit of one starting process per CPU warns about that on a laptop.
        ray.init(address="local", _system_config={"worker_maximum_startup_concurrency": max(os.cpu_count() or 1, 4)},
                 **console)
    else:
        _check_answers(address, source)
        ray.init(**console)
    if quiet:
        _one_line_cluster_events()
    cluster = _cluster(ray, address)
    where = (f"joined the Ray cluster at {address} (from {source})" if address
             else "started a local Ray instance (no RAY_ADDRESS, no cluster registered on this machine)")
    say(f"ray: {where}: {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs; full logs in {cluster.logs}"
        + ("" if verbose() else " (--verbose shows them here)"))
    return cluster


# What the first line of an event Ray publishes to drivers says before its explanation and log tail.
_EVENT_CUT = re.compile(r"\s+(Possible reasons include|This can happen when|Last \d+ lines of)")


def cluster_event_line(message: str) -> str | None:
    """The console line for an event Ray publishes to drivers (a node lost, a worker killed): its first
    line without the explanation and the ~20 lines of raylet log (`[state-dump]`) that follow; None for
    the worker start-up warnings a busy node repeats and the raylet's own "terminated" notice (the
    node-lost line follows it). The whole message stays in Ray's log folder."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    # "Raylet is terminated" names no node and comes once per driver and worker; the GCS's "marked
    # dead" line that follows a lost node names it.
    if not first or "worker processes have been started on node" in first or first.startswith("Raylet is terminated"):
        return None
    return f"ray: {_EVENT_CUT.split(first)[0].rstrip()}"


def _one_line_cluster_events() -> None:
    """Without --verbose, each event Ray publishes to this driver prints as one line (`cluster_event_line`).
    Ray prints them from its error listener thread through `ray._private.worker.print_to_stdstream`,
    looked up at each call, so wrapping that module attribute is enough (Ray 2.60)."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "_simgan_one_line", False):
        return

    def print_one_line(data, ignore_prefix: bool):
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        for message in data.get("lines", []):
            if (line := cluster_event_line(message)) is not None:
                say(line)

    print_one_line._simgan_one_line = True
    worker.print_to_stdstream = print_one_line


def _cluster(ray, address: str | None) -> Cluster:
    resources = ray.cluster_resources()
    node = ray._private.worker.global_worker.node
    return Cluster(address, resources.get("CPU", 0.0), resources.get("GPU", 0.0),
                   node.get_logs_dir_path() if node else "")


def remove_orphaned_placement_groups() -> list[dict[str, float]]:
    """Remove the placement groups whose creating actor is dead; returns their bundles' resources.

    Ray Train's controller creates its worker group's placement group. When Tune kills a trial's
    process (a trial that failed, an interrupted sweep), the controller goes with it before it
    removes the group; Ray keeps a group until its creator actor *and* job are gone,
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


def alive_nodes() -> int:
    """How many nodes of the connected cluster are alive (a 0-CPU head counts: it is a node)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_storage(paths: dict[str, str], command: str) -> None:
    """Refuse local paths up front when the connected cluster has more than one node.

    `paths`: {config key or option: URI}. Each node has its own disk: a worker or actor on
    another node would read an empty folder, and a run write checkpoints where the driver never
    looks, found only at the first checkpoint upload (refine: after every shard is refined). On
    one machine every node shares the disk, so this is our own check, not a probe of the paths.
    """
    from simgan_dist.data import storage

    local = {key: uri for key, uri in paths.items() if uri and not storage.is_s3(uri)}
    if not local:
        return
    nodes = alive_nodes()
    if nodes <= 1:
        return
    named = ", ".join(f"{key}={uri}" for key, uri in local.items())
    key = next(iter(local))
    raise UserError(f"{command}: {named} {'is a local path' if len(local) == 1 else 'are local paths'} but the Ray "
                    f"cluster has {nodes} nodes, each with its own disk: use an s3:// URI (e.g. "
                    f"{key}=s3://bucket/prefix) that every node reaches")


def estimator_task_options(tasks: int) -> tuple[dict[str, float], int | None]:
    """Ray options for `tasks` estimator fits at once, and the torch threads each may use: a whole GPU each
    when the cluster has GPUs; on CPUs an even share of the cores (at least one, at most a node's), so the
    tasks queue instead of thrashing."""
    import ray

    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, None
    node_cpus = max((node["Resources"].get("CPU", 1) for node in ray.nodes() if node["Alive"]), default=1)
    threads = int(max(1, min(resources.get("CPU", 1) // max(1, tasks), node_cpus)))
    return {"num_cpus": threads}, threads
