"""The shared history buffer actors keep history.py's semantics (run against a real Ray cluster)."""

import time

import pytest
import ray
import torch

from simgan_dist.core.history import HistoryBuffer
from simgan_dist.core.imaging import from_history_codes, history_codes
from simgan_dist.train import distributed_history as dh

pytestmark = pytest.mark.slow  # Ray actors (ray_local)

SHAPE = (1, 2, 3)


def _contents(actors) -> list[dict]:
    return ray.get([a.state_dict.remote() for a in actors])


@pytest.fixture
def shards(ray_local, request):
    run = f"test-{request.node.name}"
    yield lambda n, capacity, seed=0, wide=False: dh.create_shards(run, capacity, SHAPE, n, seed, wide=wide)
    dh.destroy_shards(run, 4)


def test_single_shard_matches_local_buffer_exactly(shards):
    local = HistoryBuffer(8, SHAPE, seed=5, dtype=torch.uint8)
    shared = dh.SharedHistory(shards(1, 8, seed=5), sample_size=2)
    torch.manual_seed(0)
    for _ in range(7):  # fill (4 pushes of 2) then replace
        images = torch.rand(2, *SHAPE) * 2 - 1
        local.push(history_codes(images, wide=False))
        shared.push(images)
        assert torch.equal(shared.sample(2), from_history_codes(local.sample(2), "cpu", torch.float32))
    assert len(shared) == len(local) == 8


@pytest.mark.parametrize("wide, dtype, step", [(False, torch.uint8, 2 / 255), (True, torch.int16, 1 / 32767)])
def test_images_travel_and_rest_as_integer_codes(shards, wide, dtype, step):
    actors = shards(2, 8, wide=wide)
    shared = dh.SharedHistory(actors, sample_size=4, wide=wide)
    images = torch.rand(4, *SHAPE) * 2 - 1
    shared.push(images)
    shared.flush()
    stored = torch.cat([s["images"] for s in _contents(actors)])
    assert stored.dtype == dtype  # uint8: 1 byte a pixel on the wire and in the actor (fp16 was 2)
    back = shared.sample(4)
    assert back.dtype == torch.float32 and len(back) == 4
    # every image comes back within half a code step of one that was pushed
    error = (back[:, None] - images[None]).abs().flatten(2).amax(2).amin(1)
    assert error.max() <= step / 2 + 1e-6


def test_shards_ask_for_resources_and_restart(shards):
    options = dh.shard_options(1000, (1, 35, 55), wide=False)
    # on the creating (driver's) node, which a spot preemption of worker nodes leaves alive; no CPU
    # there (a 0-CPU head), so the workers' nodes keep whole CPUs for Ray Data's (re)read tasks
    strategy = options["scheduling_strategy"]
    assert strategy.node_id == ray.get_runtime_context().get_node_id() and not strategy.soft  # it has the memory
    assert options["max_restarts"] >= 1
    assert options["num_cpus"] == 0 and options["memory"] >= 2 * 1000 * 35 * 55
    actors = shards(1, 4)
    shared = dh.SharedHistory(actors, sample_size=2)
    shared.push(torch.zeros(2, *SHAPE))
    shared.flush()
    shared.sample(2)  # the sample prefetched with the push
    ray.kill(actors[0], no_restart=False)  # as if its node died: Ray restarts it, empty
    # ray.kill returns before the actor is gone: a call sent at once may still reach the old one
    deadline = time.monotonic() + 120
    while ray.get(actors[0].size.remote()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(shared.sample(2)) == 0  # no crash: the D step then uses current images only
    assert shared.restarts == [0]  # the client noticed (training says so)
    shared.push(torch.zeros(2, *SHAPE))
    assert len(shared.sample(2)) == 2
    assert shared.restarts == [0]


def test_a_shard_that_cannot_come_back_fails_the_call_instead_of_hanging(ray_local):
    # As a shard whose restart finds no room on the cluster: it is never placed, so it never answers.
    actor = dh.HistoryShard.options(resources={"no-such-node": 1}).remote(4, SHAPE, 0)
    try:
        with pytest.raises(dh.HistoryUnavailable, match="did not answer within 1 s"):
            dh.SharedHistory([actor], sample_size=2, timeout_s=1)
    finally:
        ray.kill(actor)


def test_fills_and_replaces_exactly_half_a_batch_across_shards(shards):
    actors = shards(2, 8)
    shared = dh.SharedHistory(actors, sample_size=4)
    for i in range(4):
        shared.push(torch.full((2, *SHAPE), i / 4))
    shared.flush()
    assert sum(_contents(actors)[i]["images"].shape[0] for i in range(2)) == 8
    before = torch.cat([s["images"] for s in _contents(actors)])
    shared.push(torch.full((2, *SHAPE), -1.0))
    shared.flush()
    after = torch.cat([s["images"] for s in _contents(actors)])
    assert (before != after).flatten(1).any(1).sum().item() == 2
    assert (after == 0).flatten(1).all(1).sum().item() == 2  # code 0 is -1.0
    sample = shared.sample(4)
    assert sample.shape == (4, *SHAPE) and len(shared) == 8


def test_state_round_trip_and_clear(shards, tmp_path):
    """Each shard writes its own file into the checkpoint folder and reads it back, checked against
    the record the checkpoint's state keeps; a replaced file is refused, naming it."""
    from simgan_dist.train.checkpoint import CheckpointError

    actors = shards(2, 8)
    shared = dh.SharedHistory(actors, sample_size=2)
    shared.push(torch.randn(4, *SHAPE))
    shared.flush()
    saved = [state["images"].clone() for state in _contents(actors)]
    records = dh.save_shards(actors, str(tmp_path))
    assert [r["file"] for r in records] == ["history_000.pt", "history_001.pt"]
    assert dh.history_images(records) == 4 and all((tmp_path / r["file"]).stat().st_size == r["bytes"] for r in records)
    dh.clear_shards(actors)
    assert dh.SharedHistory(actors, sample_size=2).known_size == 0
    assert dh.load_shards(actors, records, str(tmp_path)) == 4
    with pytest.raises(ValueError, match="2 history shards"):
        dh.load_shards(actors[:1], records, str(tmp_path))

    # A driver SIGKILLed after that checkpoint leaves its detached shards holding newer images; the
    # same command again finds them (create_shards) and the checkpoint's buffer replaces what they hold.
    shared.push(torch.randn(4, *SHAPE))
    shared.flush()
    survivors = shards(2, 8)
    assert [a._actor_id for a in survivors] == [a._actor_id for a in actors]
    assert sum(ray.get([a.size.remote() for a in survivors])) == 8
    assert dh.load_shards(survivors, records, str(tmp_path)) == 4
    restored = [state["images"] for state in _contents(survivors)]
    assert all(torch.equal(a, b) for a, b in zip(restored, saved, strict=True))

    # checkpoints written before the files held the images in their state: still loaded
    assert dh.load_shards(survivors, _contents(survivors), str(tmp_path / "unused")) == 4
    assert dh.history_images(_contents(survivors)) == 4

    data = (tmp_path / "history_001.pt").read_bytes()
    (tmp_path / "history_001.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="history_001.pt: .* sha256 does not match the checkpoint's state"):
        dh.load_shards(survivors, records, str(tmp_path))


def _two_workers_exchange(actors, first: int, ordered: bool) -> tuple[list, list]:
    """Ranks 0 and 1 push and sample over the same shards for 4 D steps, rank `first`'s call arriving first."""
    clients = [dh.SharedHistory(actors, sample_size=4, rank_of=(rank, 2) if ordered else None) for rank in (0, 1)]
    generator = torch.Generator().manual_seed(0)
    samples = [[], []]
    for _ in range(4):
        images = [torch.rand(4, *SHAPE, generator=generator) * 2 - 1 for _ in (0, 1)]
        for rank in (first, 1 - first):  # the other worker's call lands later
            clients[rank].push(images[rank])
            time.sleep(0.15)
        for rank in (0, 1):
            samples[rank].append(clients[rank].sample(4))
    for client in clients:
        client.close()
    return _contents(actors), samples


def test_ordered_turns_make_the_buffer_independent_of_which_worker_calls_first(shards):
    """train.deterministic with several workers: the shards apply a D step's pushes, then its samples, in rank
    order, whoever arrives first; unordered, the arrival order changes what the buffer holds (the check can fail)."""
    def run(first, ordered):
        actors = shards(2, 8, seed=3)
        result = _two_workers_exchange(actors, first, ordered)
        for actor in actors:  # the next run creates its shards under the same names
            ray.kill(actor)
        return result

    rank0_first, rank1_first = run(0, True), run(1, True)
    for a, b in zip(rank0_first[0], rank1_first[0], strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["generator"], b["generator"])
    for rank in (0, 1):
        assert all(torch.equal(x, y) for x, y in zip(rank0_first[1][rank], rank1_first[1][rank], strict=True))
    unordered = [run(first, False)[0] for first in (0, 1)]
    assert any(not torch.equal(a["images"], b["images"]) for a, b in zip(*unordered, strict=True))
