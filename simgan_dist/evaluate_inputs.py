"""evaluate's inputs: the corpora read by role, refined rows paired to synthetic ones by id, and
at most evaluate.max_train_rows of them, chosen by id hash so both sides keep the same ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simgan_dist.config import Config
from simgan_dist.errors import UserError

TASK_LABELS = {"eye": "gaze", "hand": "joints_uvd"}  # what each kind's downstream estimator learns


class EvaluationError(UserError, ValueError):
    """Inputs the evaluation cannot use; the message names the dataset and what is wrong."""


@dataclass
class Inputs:
    """Everything the experiments need, refined rows aligned to synthetic rows by id.

    `kind` is "eye" (gaze labels) or "hand" (joints_uvd labels); `labels` are the synthetic rows'
    labels of that kind, which the refined rows share."""

    kind: str
    ids: np.ndarray
    synthetic: np.ndarray
    refined: np.ndarray
    labels: np.ndarray
    pupil_xy: np.ndarray | None
    real_test: np.ndarray
    real_test_labels: np.ndarray
    real_test_pupil_xy: np.ndarray | None
    real: np.ndarray | None
    real_labels: np.ndarray | None
    notes: list[str]
    # rows in the corpora, before evaluate.max_train_rows
    corpus_pairs: int
    corpus_real: int | None


def _manifest(uri: str, what: str, cfg: Config) -> Any:
    from simgan_dist.data.roles import check_kind
    from simgan_dist.data.schema import DatasetError, read_manifest
    from simgan_dist.data.storage import StorageError

    try:
        manifest = read_manifest(uri, cfg.storage)
    except (DatasetError, StorageError) as exc:
        raise EvaluationError(f"{what} dataset {uri!r} cannot be read: {exc}") from exc
    try:
        check_kind(f"evaluate --{what.replace('_', '-')}", uri, manifest.kind)
    except DatasetError as exc:
        raise EvaluationError(str(exc)) from None
    return manifest


def _load(uri: str, what: str, cfg: Config, want: list[str] | None,
          only_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The id, image and `want` label columns (`want` None: the ids alone), of `only_ids` if given."""
    from simgan_dist.data.schema import DatasetError, load_numpy
    from simgan_dist.data.storage import StorageError

    layout = _manifest(uri, what, cfg).layout
    labels = [c for c in want or [] if c in layout.label_fields]
    try:
        rows = load_numpy(uri, cfg.storage, columns=["id"] if want is None else ["id", "image", *labels],
                          only_ids=only_ids)
    except (DatasetError, StorageError) as exc:
        raise EvaluationError(f"{what} dataset {uri!r} cannot be read: {exc}") from exc
    for name in labels:  # writers refuse these; a file made by other tools may still hold them
        bad = ~np.isfinite(rows[name].reshape(len(rows[name]), -1)).all(1)
        if bad.any():
            raise EvaluationError(f"{what} dataset {uri!r}: column {name!r} holds NaN or infinity in "
                                  f"{int(bad.sum())} row(s) (e.g. id {rows['id'][bad][0]!r})")
    return rows


def _align_by_id(synthetic_ids: np.ndarray, refined_ids: np.ndarray, refined_uri: str) -> np.ndarray:
    """Index into the refined rows that puts them in synthetic order; errors name missing/extra ids."""
    syn_order, ref_order = np.argsort(synthetic_ids), np.argsort(refined_ids)
    if len(synthetic_ids) != len(refined_ids) or not np.array_equal(synthetic_ids[syn_order],
                                                                     refined_ids[ref_order]):
        missing = np.setdiff1d(synthetic_ids, refined_ids)
        extra = np.setdiff1d(refined_ids, synthetic_ids)
        raise EvaluationError(
            f"refined dataset {refined_uri!r} does not hold the synthetic dataset's ids: "
            f"{len(missing)} synthetic id(s) missing (e.g. {list(missing[:3])}), {len(extra)} unknown "
            f"(e.g. {list(extra[:3])}); refine the whole synthetic corpus with the same ids")
    align = np.empty_like(ref_order)
    align[syn_order] = ref_order
    return align


def _ids_over_cap(uri: str, what: str, cfg: Config) -> tuple[np.ndarray | None, int]:
    """(every id when the corpus holds more than evaluate.max_train_rows rows, else None; its rows)."""
    cap, rows = cfg.evaluate.max_train_rows, _manifest(uri, what, cfg).rows
    if not cap or rows <= cap:
        return None, rows
    return _load(uri, what, cfg, None)["id"], rows  # one small column; the images of the chosen rows follow


def dataset_kind(uri: str, cfg: Config) -> str:
    """"eye" when the synthetic dataset carries gaze labels, "hand" when it carries joints_uvd."""
    fields = _manifest(uri, "synthetic", cfg).layout.label_fields
    for kind, label in TASK_LABELS.items():
        if label in fields:
            return kind
    raise EvaluationError(f"synthetic dataset {uri!r} has no gaze or joints_uvd labels: the downstream experiment "
                          "trains a gaze (eyes) or hand-pose (depth maps) estimator on them")


def load_inputs(synthetic: str, refined: str, real_test: str, real: str | None, cfg: Config) -> Inputs:
    from simgan_dist.data.splits import hash_subsample

    kind = dataset_kind(synthetic, cfg)
    label = TASK_LABELS[kind]
    estimator = "gaze" if kind == "eye" else "hand-pose"
    notes = []
    cap = cfg.evaluate.max_train_rows
    every_id, corpus_pairs = _ids_over_cap(synthetic, "synthetic", cfg)
    pick = None
    if every_id is not None:
        # The pairing is checked on the whole corpus (ids alone), then both sides read the same ids.
        _align_by_id(every_id, _load(refined, "refined", cfg, None)["id"], refined)
        pick = every_id[hash_subsample(every_id, cap)]
        notes.append(f"evaluate.max_train_rows={cap}: {len(pick):,} of {corpus_pairs:,} "
                     "synthetic/refined pairs used (the same ids on both sides, chosen by id hash)")
    syn = _load(synthetic, "synthetic", cfg, [label, "pupil_xy"], pick)
    ref = _load(refined, "refined", cfg, [label], pick)
    test = _load(real_test, "real_test", cfg, [label, "pupil_xy"])
    if label not in test:
        raise EvaluationError(f"real_test dataset {real_test!r} has no {label} labels: the {estimator} estimators "
                              "are tested on labeled real images (simulate writes them to OUT/real_test)")
    if syn["image"].shape[1:] != ref["image"].shape[1:] or syn["image"].shape[1:] != test["image"].shape[1:]:
        raise EvaluationError(f"image shapes differ: synthetic {syn['image'].shape[1:]}, refined "
                              f"{ref['image'].shape[1:]}, real_test {test['image'].shape[1:]}")
    align = _align_by_id(syn["id"], ref["id"], refined)
    refined_images = ref["image"][align]
    if label in ref:
        moved = np.abs(ref[label][align] - syn[label]).reshape(len(align), -1).max(1) > 1e-6
        if moved.any():
            raise EvaluationError(f"refined dataset {refined!r} carries different {label} labels than synthetic for "
                                  f"{int(moved.sum())} id(s) (e.g. {syn['id'][moved][0]!r}): refinement must keep "
                                  "labels unchanged")
    else:
        notes.append(f"refined dataset has no {label} labels: used the synthetic labels of the same ids")
    real_images = real_labels = corpus_real = None
    if real:
        every_id, corpus_real = _ids_over_cap(real, "real", cfg)
        real_pick = None if every_id is None else every_id[hash_subsample(every_id, cap)]
        if real_pick is not None:
            notes.append(f"evaluate.max_train_rows={cap}: {len(real_pick):,} of "
                         f"{corpus_real:,} labeled real rows used (chosen by id hash)")
        got = _load(real, "real", cfg, [label], real_pick)
        if label in got:
            real_images, real_labels = got["image"], got[label]
        else:
            corpus_real = None
            notes.append("real dataset is unlabeled: no ceiling row (realism uses the held-out real_test images)")
    return Inputs(kind, syn["id"], syn["image"], refined_images, syn[label], syn.get("pupil_xy"), test["image"],
                  test[label], test.get("pupil_xy"), real_images, real_labels, notes, corpus_pairs, corpus_real)
