"""The held-out real split: the `data.real` rows training never sees, kept for the objective's realism score."""

from __future__ import annotations

import hashlib

import numpy as np

from simgan_dist.config import Config
from simgan_dist.errors import UserError


def id_hashes(ids: np.ndarray, person: bytes = b"") -> np.ndarray:
    """The first 8 bytes of blake2b(id) as uint64; `person` gives an independent hash per use."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, person=person).digest(), "big")
                        for i in ids), dtype=np.uint64, count=len(ids))


def validation_mask(ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the rows whose id falls in the held-out validation part (deterministic, order-free).

    A row belongs to it when the first 8 bytes of blake2b(id), read as a fraction of 2⁶⁴,
    are below `fraction`: the same ids are held out on every machine, in every shard order,
    and adding rows never moves an existing one across the split.
    """
    return id_hashes(ids) < int(fraction * 2**64)


def hash_subsample(ids: np.ndarray, count: int) -> np.ndarray:
    """Positions (ascending) of the `count` ids of smallest hash: deterministic and order-free.

    Hashed apart from `validation_mask` so that a subsample of `data.real` is not its held-out part.
    """
    if count >= len(ids):
        return np.arange(len(ids))
    order = np.argsort(id_hashes(ids, person=b"evaluate-sample"), kind="stable")
    return np.sort(order[:count])


def drop_validation_rows(batch: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """A batch without its validation rows (and without `id`): the real training stream."""
    keep = ~validation_mask(batch["id"], fraction)
    return {k: v[keep] for k, v in batch.items() if k != "id"}


def holds_out_real(cfg: Config) -> bool:
    """Whether training must skip the validation rows of `data.real` (no separate `data.real_val`)."""
    return cfg.train.eval_every > 0 and not cfg.data.real_val


def load_real_val(cfg: Config, count: int) -> np.ndarray:
    from simgan_dist.data.schema import load_numpy

    if cfg.data.real_val:
        return load_numpy(cfg.data.real_val, cfg.storage, columns=["image"], limit=count)["image"]
    if not cfg.data.real:
        raise UserError("train.eval_every > 0 needs held-out real images: set data.real_val, or data.real "
                        "with data.real_val_fraction > 0")
    # Ids first (one small column), then only the rows up to the count-th validation row.
    held_out = np.flatnonzero(validation_mask(load_numpy(cfg.data.real, cfg.storage, columns=["id"])["id"],
                                              cfg.data.real_val_fraction))[:count]
    if len(held_out) < 2:
        raise UserError(f"data.real_val_fraction={cfg.data.real_val_fraction} holds out {len(held_out)} row(s) of "
                        f"{cfg.data.real}: the realism score needs at least 2; raise the fraction or set data.real_val")
    rows = load_numpy(cfg.data.real, cfg.storage, columns=["image"], limit=int(held_out[-1]) + 1)
    return rows["image"][held_out]
