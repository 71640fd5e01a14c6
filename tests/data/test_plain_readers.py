"""Plain Parquet readers with their defaults read exactly a dataset's good rows (issue 12, item 6).

Metadata starts with `_` (`_manifest.json`, `_quarantine/`, `_refine_job.json`), which
pandas, pyarrow.dataset and Ray Data skip; datasets in the old layout still load.
"""

from __future__ import annotations

import pandas as pd
import pyarrow.dataset as pads
import pytest

from simgan_dist.data import simulate, storage
from simgan_dist.data.ingest import QUARANTINE_NAME, ingest, read_quarantine
from simgan_dist.data.schema import LEGACY_MANIFEST_NAME, MANIFEST_NAME, load_numpy, read_manifest

pytest.importorskip("ray")


def plain_reads(uri: str) -> dict[str, list[str]]:
    """The ids each plain reader finds under `uri`, every one called with its defaults."""
    import ray.data

    fs, path = storage.resolve(uri)
    return {
        "pandas": list(pd.read_parquet(path, filesystem=fs)["id"]),
        "pyarrow.dataset": pads.dataset(path, filesystem=fs).to_table().column("id").to_pylist(),
        "ray.data": [r["id"] for r in ray.data.read_parquet(path, filesystem=fs).take_all()],
    }


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket")


@pytest.mark.slow
def test_simulated_and_ingested_datasets_read_exactly_their_good_rows(root, unityeyes_dir, ray_local):  # noqa: F811
    simulate.simulate_dataset(storage.join(root, "eyes"), 30, 12, 0, seed=3, rows_per_shard=16, parallel=False)
    synthetic = storage.join(root, "eyes", "synthetic")
    ingested = storage.join(root, "unityeyes")
    result = ingest("unityeyes", unityeyes_dir, ingested, workers=1)
    assert result.rows == 4 and len(result.quarantined) == 6
    assert QUARANTINE_NAME.startswith("_") and MANIFEST_NAME.startswith("_")
    assert read_quarantine(ingested).num_rows == 6

    for uri, rows in ((synthetic, 30), (ingested, 4)):
        expected = sorted(load_numpy(uri, columns=["id"])["id"])
        assert len(expected) == rows
        for reader, ids in plain_reads(uri).items():
            assert sorted(ids) == expected, f"{reader} on {uri}"


def test_datasets_in_the_old_layout_still_load(tmp_path):
    """Before the `_` convention the manifest was `manifest.json` and quarantine `quarantine.parquet`."""
    simulate.simulate_dataset(str(tmp_path), 20, 0, 0, seed=1, rows_per_shard=8, parallel=False)
    uri = str(tmp_path / "synthetic")
    (tmp_path / "synthetic" / MANIFEST_NAME).rename(tmp_path / "synthetic" / LEGACY_MANIFEST_NAME)
    assert read_manifest(uri).rows == 20
    assert len(load_numpy(uri)["id"]) == 20
    # Writing over it replaces the old manifest too, so no stale one is left to disagree.
    simulate.simulate_dataset(str(tmp_path), 12, 0, 0, seed=2, rows_per_shard=8, parallel=False, overwrite=True)
    assert sorted(storage.list_files(uri)) == [MANIFEST_NAME, "part-00000.parquet", "part-00001.parquet"]
    assert read_manifest(uri).rows == 12
