"""Which datasets each role takes, by the manifest's `kind`.

    synthetic   simulate/ingest: rendered, labeled images — what the refiner refines
    real        real images for training (and, held out, for the label-free objective)
    real_test   labeled real images for the final evaluation only: never training or selection data
    refined     refine's output: synthetic rows with refined images, the same ids and labels

A dataset of a kind its role does not take is refused with both named. Manifests with an
empty `kind` (hand-written or converted ones) are taken anywhere: nothing says what they hold.
"""

from __future__ import annotations

from simgan_dist.config import Config, StorageConfig
from simgan_dist.data.schema import DatasetError, read_manifest

ROLES: dict[str, tuple[str, ...]] = {
    "data.synthetic": ("synthetic",),
    "data.real": ("real",),
    "data.real_val": ("real",),
    "data.real_test": ("real_test",),
    "refine --input": ("synthetic",),
    "evaluate --synthetic": ("synthetic",),
    "evaluate --refined": ("refined",),
    "evaluate --real-test": ("real_test",),
    "evaluate --real": ("real",),
}


def check_kind(role: str, uri: str, kind: str) -> None:
    """Refuse a dataset whose manifest `kind` the role does not take; the message names both."""
    allowed = ROLES[role]
    if not kind or kind in allowed:
        return
    why = "; the test set is never training or selection data" if kind == "real_test" else ""
    raise DatasetError(f"{role}: {uri} is a {kind} dataset{why}; {role} takes {' or '.join(allowed)} datasets")


def check_role(role: str, uri: str, storage_cfg: StorageConfig | None = None) -> None:
    check_kind(role, uri, read_manifest(uri, storage_cfg).kind)


def check_data_roles(cfg: Config) -> None:
    """Every dataset training reads is of a kind its key takes. Training never opens `data.real_test`,
    not even its manifest; evaluate checks its own `--real-test`."""
    for key in ("synthetic", "real", "real_val"):
        uri = getattr(cfg.data, key)
        if uri:
            check_role(f"data.{key}", uri, cfg.storage)
