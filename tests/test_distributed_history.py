"""The shared history buffer actors keep history.py's semantics (run against a real Ray cluster)."""

import pytest
import torch

from simgan_dist import distributed_history as dh
from simgan_dist.history import HistoryBuffer

SHAPE = (1, 2, 3)


@pytest.fixture
def shards(ray_local, request):
    run = f"test-{request.node.name}"
    yield lambda n, capacity, seed=0: dh.create_shards(run, capacity, SHAPE, n, seed)
    dh.destroy_shards(run, 4)


def test_single_shard_matches_local_buffer_exactly(shards):
    local = HistoryBuffer(8, SHAPE, seed=5)
    shared = dh.SharedHistory(shards(1, 8, seed=5), sample_size=2)
    torch.manual_seed(0)
    for _ in range(7):  # fill (4 pushes of 2) then replace
        images = torch.randn(2, *SHAPE).half()
        local.push(images)
        shared.push(images)
        assert torch.equal(shared.sample(2), local.sample(2))
    assert len(shared) == len(local) == 8


def test_fills_and_replaces_exactly_half_a_batch_across_shards(shards):
    actors = shards(2, 8)
    shared = dh.SharedHistory(actors, sample_size=4)
    for i in range(4):
        shared.push(torch.full((2, *SHAPE), float(i)))
    shared.flush()
    assert sum(dh.save_shards(actors)[i]["images"].shape[0] for i in range(2)) == 8
    before = torch.cat([s["images"] for s in dh.save_shards(actors)])
    shared.push(torch.full((2, *SHAPE), 99.0))
    shared.flush()
    after = torch.cat([s["images"] for s in dh.save_shards(actors)])
    assert (before != after).flatten(1).any(1).sum().item() == 2
    assert (after == 99).flatten(1).all(1).sum().item() == 2
    sample = shared.sample(4)
    assert sample.shape == (4, *SHAPE) and len(shared) == 8


def test_state_round_trip_and_clear(shards):
    actors = shards(2, 8)
    shared = dh.SharedHistory(actors, sample_size=2)
    shared.push(torch.randn(4, *SHAPE))
    shared.flush()
    states = dh.save_shards(actors)
    dh.clear_shards(actors)
    assert dh.SharedHistory(actors, sample_size=2).known_size == 0
    assert dh.load_shards(actors, states) == 4
    with pytest.raises(ValueError, match="2 history shards"):
        dh.load_shards(actors[:1], states)
