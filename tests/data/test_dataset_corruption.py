"""Property tests (issue 24): a dataset whose shards or manifest are damaged at random reads as
exactly its original rows or fails with a DatasetError naming the dataset — never a silent wrong
result, never a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simgan_dist.data.schema import MANIFEST_NAME, DatasetError, load_numpy
from simgan_dist.data.simulate import simulate_dataset

FIELDS = ["rows", "shards", "image_shape", "image_dtype", "label_fields", "kind", "format", "format_version"]
ODD_VALUES = [None, 0, -1, 1, 2**63, 1.5, "", "x", "../x", "/etc/passwd", [], [0], [35, 55, 1], [1, 1, 1], {},
              {"gaze": [3]}, {"gaze": "abc"}, {"gaze": [-1]}, "uint16", "float32", True]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    simulate_dataset(str(root), 30, 0, 0, seed=3, rows_per_shard=12, parallel=False)
    uri = root / "synthetic"
    return uri, load_numpy(str(uri))


def _same(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def _check(uri, want) -> None:
    try:
        got = load_numpy(str(uri))
    except DatasetError as exc:
        assert str(uri) in str(exc)
        return
    assert _same(got, want), "a damaged dataset read as other rows without an error"


shard_damage = st.tuples(st.integers(0, 2), st.sampled_from(["flip", "truncate", "append"]),
                         st.floats(0, 1, exclude_max=True), st.integers(1, 255))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=shard_damage)
def test_a_damaged_shard_is_an_error_or_reads_exactly(original, tmp_path_factory, damage):
    source, want = original
    uri = tmp_path_factory.mktemp("d") / "ds"
    shutil.copytree(source, uri)
    index, how, where, byte = damage
    shard = uri / json.loads((uri / MANIFEST_NAME).read_text())["shards"][index]["path"]
    data = bytearray(shard.read_bytes())
    at = int(where * len(data))
    if how == "flip":
        data[at] ^= byte
    elif how == "truncate":
        del data[at:]
    else:
        data += bytes([byte]) * (at + 1)
    shard.write_bytes(bytes(data))
    _check(uri, want)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=st.sampled_from(ODD_VALUES), shard=st.integers(0, 2),
       shard_field=st.sampled_from(["", "path", "rows", "bytes", "sha256"]))
def test_a_damaged_manifest_is_an_error_or_reads_exactly(original, tmp_path_factory, field, value, shard,
                                                         shard_field):
    source, want = original
    uri = tmp_path_factory.mktemp("m") / "ds"
    shutil.copytree(source, uri)
    manifest = json.loads((uri / MANIFEST_NAME).read_text())
    if shard_field:  # one field of one shard entry
        manifest["shards"][shard][shard_field] = value
    else:
        manifest[field] = value
    (uri / MANIFEST_NAME).write_text(json.dumps(manifest))
    _check(uri, want)
