"""Dataset roles (issue 24 item 7): every place that takes a dataset takes only the manifest kinds
that make sense there, and names the role and the kind otherwise; real_test is never training or
selection data. Manifests with an empty kind are taken anywhere (nothing says what they hold)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from simgan_dist.config import load_config
from simgan_dist.core.models import build_discriminator, build_refiner
from simgan_dist.data.roles import ROLES, check_role
from simgan_dist.data.schema import MANIFEST_NAME, DatasetError, load_numpy, read_manifest
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.data.writer import DatasetWriter
from simgan_dist.evaluate_inputs import EvaluationError, load_inputs
from simgan_dist.refine import plan_job
from simgan_dist.refine_shards import RefineError
from simgan_dist.train.checkpoint import write_checkpoint
from simgan_dist.train.driver import check_corpora
from simgan_dist.train.local import train_local


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """One dataset of each kind: simulate's three splits and a refined copy of the synthetic one."""
    root = tmp_path_factory.mktemp("roles")
    simulate_dataset(str(root), 40, 40, 40, seed=1, parallel=False)
    syn = load_numpy(str(root / "synthetic"))
    with DatasetWriter(str(root / "refined"), read_manifest(str(root / "synthetic")).layout, kind="refined",
                       source="test") as writer:
        writer.write({k: v for k, v in syn.items() if k != "source"})
    return {kind: str(root / kind) for kind in ("synthetic", "real", "real_test", "refined")}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_takes_its_kinds_and_names_role_and_kind_otherwise(kinds, role):
    for kind, uri in kinds.items():
        if kind in ROLES[role]:
            check_role(role, uri)
            continue
        why = "; the test set is never training or selection data" if kind == "real_test" else ""
        with pytest.raises(DatasetError, match=f"^{role}: {uri} is a {kind} dataset{why}; {role} takes "):
            check_role(role, uri)


def test_real_test_is_never_training_or_selection_data(kinds, tmp_path):
    base = ["train.iterations=1", "train.pretrain_refiner_steps=1", "train.pretrain_disc_steps=1"]
    for key in ("data.synthetic", "data.real", "data.real_val"):
        cfg = load_config("tiny", overrides=[*base, f"data.synthetic={kinds['synthetic']}",
                                             f"data.real={kinds['real']}", f"{key}={kinds['real_test']}"])
        message = f"{key}: {kinds['real_test']} is a real_test dataset; the test set is never training or selection"
        with pytest.raises(DatasetError, match=message):
            train_local(cfg, tmp_path / "run", progress=False)
        with pytest.raises(DatasetError, match=message):
            check_corpora(cfg)
    assert not (tmp_path / "run").exists()
    swapped = load_config("tiny", overrides=[f"data.synthetic={kinds['real']}", f"data.real={kinds['synthetic']}"])
    with pytest.raises(DatasetError, match="data.synthetic: .* is a real dataset; data.synthetic takes synthetic"):
        check_corpora(swapped)


def test_refine_and_evaluate_check_their_inputs(kinds, tmp_path):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    checkpoint = str(write_checkpoint(tmp_path / "ckpt", cfg, build_refiner(cfg.model),
                                      build_discriminator(cfg.model)))
    for kind in ("real_test", "refined"):
        with pytest.raises(RefineError, match=f"refine --input: .* is a {kind} dataset;.* refine --input takes "
                                              "synthetic datasets"):
            plan_job(checkpoint, kinds[kind], str(tmp_path / "out"), cfg)
    plan_job(checkpoint, kinds["synthetic"], str(tmp_path / "out"), cfg)

    # the refined dataset refine writes (kind "refined") is what evaluate --refined takes
    load_inputs(kinds["synthetic"], kinds["refined"], kinds["real_test"], kinds["real"], cfg)
    with pytest.raises(EvaluationError, match="evaluate --real-test: .* is a synthetic dataset"):
        load_inputs(kinds["synthetic"], kinds["refined"], kinds["synthetic"], None, cfg)
    with pytest.raises(EvaluationError, match="evaluate --real: .* is a real_test dataset; the test set is never"):
        load_inputs(kinds["synthetic"], kinds["refined"], kinds["real_test"], kinds["real_test"], cfg)
    with pytest.raises(EvaluationError, match="evaluate --refined: .* is a synthetic dataset"):
        load_inputs(kinds["synthetic"], kinds["synthetic"], kinds["real_test"], None, cfg)


def test_a_manifest_without_a_kind_is_taken_anywhere(kinds, tmp_path):
    path = f"{kinds['real_test']}/{MANIFEST_NAME}"
    manifest = json.loads(open(path).read())
    unkinded = tmp_path / "old"
    unkinded.mkdir()
    for shard in manifest["shards"]:
        (unkinded / shard["path"]).parent.mkdir(parents=True, exist_ok=True)
        (unkinded / shard["path"]).write_bytes(open(f"{kinds['real_test']}/{shard['path']}", "rb").read())
    (unkinded / MANIFEST_NAME).write_text(json.dumps({**manifest, "kind": ""}))
    for role in ROLES:
        check_role(role, str(unkinded))
    assert np.array_equal(load_numpy(str(unkinded))["id"], load_numpy(kinds["real_test"])["id"])
