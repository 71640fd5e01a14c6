"""One history buffer shared by every training worker, sharded over a few Ray actors.

Each `HistoryShard` actor wraps a `HistoryBuffer` (history.py), so the semantics are the
ones the unit tests pin. A worker's `SharedHistory` client splits every push evenly over
the shards (fire-and-forget), each shard's reply being the next sample, which then
travels while the refiner steps run. Because every shard receives the same share of
every push, the shards fill evenly and sampling the same share from each is uniform over
the logical buffer.

Images travel and are stored as integer codes (`imaging.history_codes`): uint8 for
8-bit data (half the bytes of fp16, and exactly the data's own precision), int16 for
depth. They are encoded on the training device and decoded there after a sample.

Actors are named after the run (`simgan-history/<run>/<shard>`): one buffer per run, and
a restarted worker group finds the same buffer. They live on the driver's node, holding no
CPU there and the memory their images take (`shard_options`), so losing worker nodes (spot)
leaves the buffer whole. A shard whose actor dies anyway (a `ray.kill`, a driver node
without room for them) is restarted empty by Ray and refills within a few D steps: training goes on,
and because every start of a shard has its own incarnation id the clients notice, and rank
0 says so (a warning line and the `history_restarts` metric). The checkpoint still holds
the last contents: each shard writes its images into the checkpoint's folder itself
(`history_NNN.pt`, data only), in parallel, and the checkpoint's state records each file's
image count, size and sha256. (The hand preset's buffer is ~20 GB: through rank 0, it went
over one network link and rank 0's local disk before its upload.) A shard that cannot come
back (restarts used up, no room for it on the cluster) fails the worker's call after
`REPLY_TIMEOUT_S` instead of hanging it, and the worker group restarts from the latest
checkpoint (`train.max_failures`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import queue
import threading
import uuid

import numpy as np
import ray
import torch

from simgan_dist.core.history import HistoryBuffer
from simgan_dist.core.imaging import from_history_codes, history_codes, to_host
from simgan_dist.data import storage
from simgan_dist.data.pipeline import adopt_env

NAMESPACE = "simgan_dist"
SHARD_CPUS = 0.25  # a push or sample is a few ms of copying; enough to be scheduled, not to crowd
MAX_RESTARTS = 3
# A push or sample answers in milliseconds and a restarted shard within seconds; one that cannot be
# placed again would never answer.
REPLY_TIMEOUT_S = 600.0
# How long a worker's turn at a shard waits for a worker that never comes (train.deterministic).
TURN_TIMEOUT_S = 60.0
HISTORY_FILE = "history_{:03d}.pt"  # shard k's images in a checkpoint folder


class HistoryUnavailable(RuntimeError):
    """The history shard actors did not answer in time."""


class TurnOrder:
    """Who may go next at a shard when the workers' calls must be served in a fixed order.

    A turn is (call, phase, rank): a client's call count, 0 for its push and 1 for its sample, and its
    rank. A turn may go once every earlier turn of the same call has gone, or belongs to a rank already
    seen at a later call (its call here went to an earlier incarnation of the shard, or it has none:
    it will not come). A rank that never comes (lost with its node) holds the others up to
    TURN_TIMEOUT_S, after which they go on without it: the run restarts from a checkpoint anyway.
    """

    def __init__(self):
        self.changed = asyncio.Condition()
        self.reset()

    def reset(self) -> None:
        """A new set of clients (a run's start, a restore) counts its calls from 0 again."""
        self.gone: set[tuple[int, int, int]] = set()
        self.latest: dict[int, int] = {}  # rank -> its latest call seen

    def _may_go(self, call: int, phase: int, rank: int, world: int) -> bool:
        return all((call, p, r) in self.gone or self.latest.get(r, -1) > call
                   for p in (0, 1) for r in range(world) if (p, r) < (phase, rank))

    async def wait(self, call: int, phase: int, rank: int, world: int) -> None:
        async with self.changed:
            self.latest[rank] = max(self.latest.get(rank, -1), call)
            self.changed.notify_all()  # a rank at a later call releases the turns it skipped
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self._may_go(call, phase, rank, world)),
                                       TURN_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass

    async def done(self, call: int, phase: int, rank: int) -> None:
        async with self.changed:
            oldest = min(self.latest.values(), default=call)
            self.gone = {t for t in self.gone if t[0] >= oldest} | {(call, phase, rank)}
            self.changed.notify_all()


@ray.remote
class HistoryShard:
    """One part of the shared buffer. An asyncio actor: its calls run one at a time on its event loop,
    except that an `exchange` in turn order (train.deterministic) awaits its turn without holding it."""

    def __init__(self, capacity: int, image_shape: tuple[int, ...], seed: int, wide: bool = False):
        self.args = (capacity, image_shape)
        self.seed = seed
        self.dtype = torch.int16 if wide else torch.uint8
        self.incarnation = uuid.uuid4().hex  # new at every (re)start of the actor, unlike clear()
        self.turns = TurnOrder()
        self.clear()

    def clear(self) -> int:
        """Start empty (a fresh run that reuses the name of one that left no checkpoint)."""
        self.buffer = HistoryBuffer(*self.args, seed=self.seed, dtype=self.dtype)
        self.turns.reset()
        return 0

    def push(self, codes: np.ndarray) -> int:
        self.buffer.push(torch.from_numpy(codes))
        return len(self.buffer)

    async def exchange(self, codes: np.ndarray | None, k: int, turn: tuple[int, int, int] | None = None
                       ) -> tuple[torch.Tensor, int, str]:
        """A client's push (if any) and its next sample in one call: one actor round trip per shard and
        D step. `turn` = (the client's call count, its rank, the world size): the pushes of a D step are
        applied in rank order, then its samples are drawn in rank order, so the buffer's contents and
        draws do not depend on which worker's call arrives first (train.deterministic)."""
        if turn is None:
            if codes is not None:
                self.push(codes)
            return self.sample(k)
        call, rank, world = turn
        await self.turns.wait(call, 0, rank, world)
        if codes is not None:
            self.push(codes)
        await self.turns.done(call, 0, rank)
        await self.turns.wait(call, 1, rank, world)
        reply = self.sample(k)
        await self.turns.done(call, 1, rank)
        return reply

    def sample(self, k: int) -> tuple[torch.Tensor, int, str]:
        if not len(self.buffer):  # restarted after a node failure: empty until the next push
            return torch.empty((0, *self.buffer.image_shape), dtype=self.dtype), 0, self.incarnation
        return self.buffer.sample(k), len(self.buffer), self.incarnation

    def size(self) -> int:
        return len(self.buffer)

    def status(self) -> tuple[int, str]:
        return len(self.buffer), self.incarnation

    def state_dict(self) -> dict:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> int:
        self.buffer.load_state_dict(state)
        self.turns.reset()
        return len(self.buffer)

    def save_to(self, uri: str, storage_cfg, env: list | None) -> dict:
        """Write the buffer to `uri` (atomically); returns the checkpoint state's record of the file."""
        adopt_env(env)
        out = io.BytesIO()
        torch.save(self.buffer.state_dict(), out)
        data = out.getvalue()
        storage.write_bytes_atomic(uri, data, storage_cfg)
        return {"file": uri.rsplit("/", 1)[-1], "count": len(self.buffer), "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def load_from(self, uri: str, record: dict, storage_cfg, env: list | None) -> int:
        """Load what `save_to` wrote, checked against its record (size, sha256) and as data only."""
        from simgan_dist.train.checkpoint import CheckpointError, load_data

        adopt_env(env)
        data = storage.read_bytes(uri, storage_cfg)
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise CheckpointError(f"{uri}: {len(data)} bytes whose sha256 does not match the checkpoint's state "
                                  f"({record['bytes']} bytes): a corrupt or replaced history file")
        return self.load_state_dict(load_data(data, uri))


def _shard_name(run: str, index: int) -> str:
    return f"simgan-history/{run}/{index}"


def shard_options(capacity: int, image_shape: tuple[int, ...], wide: bool, num_shards: int = 1) -> dict:
    """Resources and placement of one shard actor holding `capacity` images.

    On the node of the process that creates them (the driver's: the head node under `ray job
    submit`, which is not preempted), holding no CPU there (a KubeRay head has none): worker nodes
    come and go (spot), and a shard on one lost its images with it. Worse, shards spread over the
    worker nodes took a slice of every node's CPU, so once the whole pool was replaced no node had
    the whole CPU that Ray's lineage reconstruction of the lost (materialized) corpus blocks needs:
    the restarted workers waited for their first batch forever. `soft`: a driver node without the
    memory for all `num_shards` places them elsewhere (Ray's soft affinity alone also spilled them
    to a worker node when the driver's node was merely busy). The plan (`resources.plan_workers`)
    still sets SHARD_CPUS each aside, as slack for Ray Data's tasks.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    image_bytes = math.prod(image_shape) * (2 if wide else 1)
    memory = 2 * capacity * image_bytes + (64 << 20)  # the images, a checkpoint's copy, samples in flight
    node = ray.get_runtime_context().get_node_id()
    room = next((n["Resources"].get("memory", 0) for n in ray.nodes() if n["NodeID"] == node and n["Alive"]), 0)
    return {
        "num_cpus": 0,
        "memory": memory,
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": MAX_RESTARTS,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=room < num_shards * memory),
    }


def create_shards(run: str, capacity: int, image_shape: tuple[int, ...], num_shards: int, seed: int,
                  wide: bool = False) -> list[ray.actor.ActorHandle]:
    """Create (or find, for a resumed run) the run's buffer shards; `capacity` (the logical
    buffer, all workers together) is split evenly."""
    per_shard = -(-capacity // num_shards)
    options = shard_options(per_shard, tuple(image_shape), wide, num_shards)
    return [
        HistoryShard.options(name=_shard_name(run, i), namespace=NAMESPACE, get_if_exists=True,
                             lifetime="detached", **options).remote(per_shard, tuple(image_shape), seed + i, wide)
        for i in range(num_shards)
    ]


def get_shards(run: str, num_shards: int) -> list[ray.actor.ActorHandle]:
    return [ray.get_actor(_shard_name(run, i), namespace=NAMESPACE) for i in range(num_shards)]


def destroy_shards(run: str, num_shards: int) -> None:
    for i in range(num_shards):
        try:
            ray.kill(ray.get_actor(_shard_name(run, i), namespace=NAMESPACE))
        except ValueError:
            pass


def save_shards(shards: list[ray.actor.ActorHandle], folder: str, storage_cfg=None, env: list | None = None
                ) -> list[dict]:
    """Each shard writes its images into the checkpoint folder `folder` itself, all at once; returns
    the records the checkpoint's state keeps (`load_shards` reads them back)."""
    return ray.get([s.save_to.remote(storage.join(folder, HISTORY_FILE.format(i)), storage_cfg, env)
                    for i, s in enumerate(shards)])


def clear_shards(shards: list[ray.actor.ActorHandle]) -> None:
    ray.get([s.clear.remote() for s in shards])


def load_shards(shards: list[ray.actor.ActorHandle], records: list[dict], folder: str, storage_cfg=None,
                env: list | None = None) -> int:
    """Refill the shards from a checkpoint's `records` (`save_shards`'), each shard reading its own
    file in `folder`; a record holding the images themselves (checkpoints written before the
    files) is loaded as it is. Returns how many images came back."""
    if len(records) != len(shards):
        raise ValueError(f"checkpoint holds {len(records)} history shards, this run has {len(shards)}")
    return sum(ray.get([
        s.load_from.remote(storage.join(folder, r["file"]), r, storage_cfg, env) if "file" in r
        else s.load_state_dict.remote(r)
        for s, r in zip(shards, records, strict=True)]))


def history_images(records: list[dict]) -> int:
    """How many images a checkpoint state's history records hold (either form `load_shards` takes)."""
    return sum(r["count"] if "file" in r else len(r["images"]) for r in records)


class SharedHistory:
    """The `History` interface of algorithm.py over the shard actors, with one-step prefetch.

    One host sync per D step (the push's device→host copy of b/2 integer images); the actor
    calls themselves run in a background thread (`history-client`): one per shard and push,
    whose reply is the next sample, so the training thread neither submits calls nor
    deserialises replies, and the K_g refiner steps between two D steps never wait on the
    buffer. Each shard still sees one caller's calls in order. `restarts` lists the index of
    every shard seen restarted (empty) since this client started. `rank_of` = (rank, world size)
    makes the shards serve every worker's calls in rank order (`HistoryShard.exchange`,
    train.deterministic).
    """

    def __init__(self, shards: list[ray.actor.ActorHandle], sample_size: int,
                 device: torch.device | str = "cpu", wide: bool = False, timeout_s: float = REPLY_TIMEOUT_S,
                 rank_of: tuple[int, int] | None = None):
        self.shards = shards
        self.rank_of = rank_of
        self.calls = 0  # exchanges made: every worker makes the same sequence, so the counts line up
        self.sample_size = sample_size
        self.device = torch.device(device)
        self.wide = wide
        self.timeout_s = timeout_s
        status = self._get([s.status.remote() for s in shards])
        self.known_size = sum(size for size, _ in status)
        self.incarnations = [incarnation for _, incarnation in status]
        self.restarts: list[int] = []
        self.outbox: queue.Queue = queue.Queue()  # pushes for the background client, in order
        self.answered = threading.Condition()
        self.in_flight = 0  # pushes not answered yet
        self.latest: list | BaseException | None = None  # the newest push's replies, until sampled
        threading.Thread(target=self._serve, name="history-client", daemon=True).start()

    def _unavailable(self) -> HistoryUnavailable:
        return HistoryUnavailable(
            f"the history buffer's shard actors did not answer within {self.timeout_s:g} s: one that died "
            "could not be restarted (restarts used up, or no room for it on the cluster)")

    def _get(self, refs: list[ray.ObjectRef]) -> list:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise self._unavailable() from exc

    def _turn(self) -> tuple[int, int, int] | None:
        """The next exchange's turn at the shards (None: served as it arrives)."""
        self.calls += 1
        return None if self.rank_of is None else (self.calls - 1, *self.rank_of)

    def _serve(self) -> None:
        while (job := self.outbox.get()) is not None:
            chunks, turn = job
            try:
                replies = self._get([shard.exchange.remote(chunk, self._share, turn)
                                     for shard, chunk in zip(self.shards, chunks, strict=False)])
            except BaseException as exc:  # raised in the training thread at its next sample or flush
                replies = exc
            with self.answered:
                self.latest = replies
                self.in_flight -= 1
                self.answered.notify_all()

    def _wait_answered(self) -> None:
        if not self.answered.wait_for(lambda: self.in_flight == 0, timeout=self.timeout_s):
            raise self._unavailable()
        if isinstance(self.latest, BaseException):
            raise self.latest

    def __len__(self) -> int:
        return self.known_size

    @property
    def _share(self) -> int:
        return -(-self.sample_size // len(self.shards))

    def sample(self, k: int) -> torch.Tensor:
        if k != self.sample_size:
            raise ValueError(f"this history client samples {self.sample_size} images, asked for {k}")
        with self.answered:
            self._wait_answered()
            replies, self.latest = self.latest, None
        if replies is None:  # no push since the last sample (a run's first D step after a resume)
            turn = self._turn()
            replies = self._get([s.exchange.remote(None, self._share, turn) for s in self.shards])
        for i, (_, _, incarnation) in enumerate(replies):
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.restarts.append(i)
        self.known_size = sum(size for _, size, _ in replies)
        codes = torch.cat([images for images, _, _ in replies])[:k]
        return from_history_codes(codes, self.device, torch.float32)

    def push(self, images: torch.Tensor) -> None:
        chunks = np.array_split(to_host(history_codes(images, self.wide)), len(self.shards))
        with self.answered:
            self.in_flight += 1
        self.outbox.put((chunks, self._turn()))
        self.known_size = max(self.known_size, 1)

    def flush(self) -> None:
        """Wait until this client's pushes have landed (before a checkpoint)."""
        with self.answered:
            self._wait_answered()

    def pending_sample(self) -> list[tuple[torch.Tensor, int]] | None:
        """The sample the latest push's replies brought, not drawn yet (call after `flush`). The shards'
        saved state comes after it: a checkpoint keeps it, or a resumed run would draw another."""
        return None if self.latest is None else [(codes, size) for codes, size, _ in self.latest]

    def restore_pending_sample(self, replies: list[tuple[torch.Tensor, int]] | None) -> None:
        """`pending_sample` from a checkpoint: the next `sample` returns it, as the saved run's would have."""
        if replies is not None:
            self.latest = [(codes, size, incarnation)
                           for (codes, size), incarnation in zip(replies, self.incarnations, strict=True)]

    def close(self) -> None:
        """End the background client once its pushes are sent."""
        self.outbox.put(None)
