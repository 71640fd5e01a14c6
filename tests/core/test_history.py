import pytest
import torch

from simgan_dist.core.history import HistoryBuffer


def _images(n, value):
    return torch.full((n, 1, 2, 3), float(value))


def test_fills_then_replaces_exactly_half_a_batch():
    buf = HistoryBuffer(capacity=10, image_shape=(1, 2, 3), seed=0)
    assert len(buf) == 0
    for i in range(5):
        buf.push(_images(2, i + 1))
    assert len(buf) == 10 and buf.full  # the public ports' buffer never fills
    before = buf.images.clone()
    slots = buf.push(_images(2, 99))
    assert len(buf) == 10
    changed = (buf.images != before).flatten(1).any(1)
    assert changed.sum().item() == 2
    assert sorted(slots.tolist()) == sorted(changed.nonzero().flatten().tolist())


def test_push_straddling_capacity_appends_then_replaces_older_slots():
    buf = HistoryBuffer(capacity=5, image_shape=(1, 2, 3), seed=1)
    buf.push(_images(4, 1))
    slots = buf.push(_images(3, 2))
    assert slots[0].item() == 4 and len(set(slots.tolist())) == 3
    assert all(s < 4 for s in slots[1:].tolist())
    assert (buf.images == 2).flatten(1).all(1).sum().item() == 3


def test_sample_draws_stored_images_without_replacement():
    buf = HistoryBuffer(capacity=8, image_shape=(1, 2, 3), seed=0)
    buf.push(torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 2, 3))
    sample = buf.sample(4)
    values = sample[:, 0, 0, 0].tolist()
    assert len(set(values)) == 4 and all(0 <= v < 8 for v in values)
    assert len(buf.sample(100)) == 8


def test_state_dict_round_trip_continues_identically():
    a = HistoryBuffer(capacity=6, image_shape=(1, 2, 3), seed=3)
    for _i in range(4):
        a.push(torch.randn(2, 1, 2, 3))
    b = HistoryBuffer(capacity=6, image_shape=(1, 2, 3), seed=99)
    b.load_state_dict(a.state_dict())
    assert len(b) == len(a)
    x = torch.randn(2, 1, 2, 3)
    assert torch.equal(a.push(x), b.push(x))
    assert torch.equal(a.sample(3), b.sample(3))


def test_wrong_shape_is_rejected():
    buf = HistoryBuffer(capacity=4, image_shape=(1, 2, 3))
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        buf.push(torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
