"""The refine job's actor pool: shard tasks on `refine.min_actors`..`refine.max_actors` RefinerActors.

Our own pool rather than Ray Data's `ActorPoolStrategy`: the tasks are a list of row ranges and the
actors read and write storage themselves, so all Ray Data added was its scheduling, and with it
three helper actors busy on every node and actor constructor arguments held in the object store
(Ray warns that such an actor, restarted after a lost node, can fail). Here actors are built from
small inlined values; the weights and credentials travel with each task (`RefineShared`).

An actor is restarted wherever there is room after its node is lost (`max_restarts=-1`), and its
queued tasks are resubmitted to it (`max_task_retries=-1`); a task overwrites the same shard name,
so a retry never writes a row twice. `min_actors` start at once (an autoscaler sees those not yet
placed); while tasks are waiting, one more starts (up to `max_actors`) whenever the cluster has room
for it, and while it has none the autoscaler is asked for it. Consecutive tasks go to the same actor,
which keeps the input shard they share (`VerifiedInputs`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterator

import ray

from simgan_dist.data import storage
from simgan_dist.data.pipeline import share_env
from simgan_dist.refine_shards import RefinerActor, RefineShared, ShardInfo, ShardTask, actor_resources
from simgan_dist.train.resources import clear_resource_request, request_beside_other_runs

# Shard tasks running at once in one actor (while one waits on storage, the other computes),
# and queued per actor so the next starts without a round trip to the driver.
TASKS_RUNNING_PER_ACTOR = 2
TASKS_QUEUED_PER_ACTOR = 4
# How often the driver looks for room for another actor while it waits for results, and how long
# an autoscaler request for more lasts unless it is renewed (a killed driver's lapses by itself).
GROWTH_CHECK_S = 2.0
GROWTH_REQUEST_S = 60.0


def _has_room(resources: dict[str, float]) -> bool:
    free = ray.available_resources()
    need = {"GPU": resources.get("num_gpus", 0), "CPU": resources.get("num_cpus", 0)}
    return all(free.get(name, 0) >= amount for name, amount in need.items() if amount)


def run_shard_tasks(job, todo: list[tuple[ShardTask, bool]]) -> Iterator[tuple[ShardTask, ShardInfo, bool, str]]:
    """Run every (task, exists) of a `RefineJob` on the pool; yields (task, info, reused, error) as each
    finishes. The actors are gone when the iterator is."""
    cfg = job.cfg.refine
    resources = actor_resources(cfg)
    actor_class = ray.remote(RefinerActor).options(
        max_restarts=-1, max_task_retries=-1, max_concurrency=TASKS_RUNNING_PER_ACTOR, **resources)
    # The actors get the storage credentials in their environment, never as arguments.
    actor_io = dataclasses.replace(job.io, storage_cfg=storage.without_secrets(job.io.storage_cfg))
    shared = RefineShared(weights=[ray.put(job.weights)], env=share_env(storage.worker_env(job.io.storage_cfg)))
    queue, actors = deque(todo), []
    starting, free_slots, running = {}, {}, {}
    asked_at = -GROWTH_REQUEST_S

    def start_actor() -> None:
        actor = actor_class.remote(job.model_cfg, actor_io, job.batch_size, cfg.compile)
        actors.append(actor)
        starting[actor.ready.remote()] = actor

    for _ in range(min(cfg.min_actors, len(queue))):
        start_actor()
    try:
        while queue or running:
            if not starting and len(actors) < cfg.max_actors and len(queue) > TASKS_QUEUED_PER_ACTOR * len(actors):
                if _has_room(resources):
                    start_actor()
                elif time.monotonic() - asked_at > GROWTH_REQUEST_S / 2:
                    bundle = {"GPU": cfg.num_gpus} if cfg.num_gpus else {"CPU": 1.0}
                    request_beside_other_runs([bundle] * (cfg.max_actors - len(actors)), GROWTH_REQUEST_S)
                    asked_at = time.monotonic()
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=GROWTH_CHECK_S)
            for ref in done:
                if ref in starting:
                    actor = starting.pop(ref)
                    ray.get(ref)
                    free_slots[actor] = TASKS_QUEUED_PER_ACTOR
                else:
                    actor, task = running.pop(ref)
                    free_slots[actor] += 1
                    yield (task, *ray.get(ref))
            for actor in free_slots:
                while free_slots[actor] and queue:
                    task, exists = queue.popleft()
                    running[actor.run.remote(task, exists, shared)] = (actor, task)
                    free_slots[actor] -= 1
    finally:
        for actor in actors:
            ray.kill(actor)
        clear_resource_request()
