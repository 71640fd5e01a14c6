"""The simulator job: render the `synthetic`, `real` and `real_test` splits and write them as datasets.

What the rows look like and how they are drawn (eyes, hands, labels) is `render.py`.

Determinism: every block of BLOCK rows draws from its own generator seeded by
(seed, kind, split, block index), so row i of a split is the same whatever the shard
size or the number of workers.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from simgan_dist.config import StorageConfig, load_config
from simgan_dist.core.host_memory import reuse_freed_memory
from simgan_dist.data import storage
from simgan_dist.data.render import (
    GAZE_CONVENTION,
    HAND_SIZE,
    LAYOUTS,
    RENDERERS,
    hand_layout,
    render_eyes,
    render_hands,
)
from simgan_dist.data.schema import Layout, ShardInfo
from simgan_dist.data.writer import commit, make_manifest, prepare_output, write_shard

BLOCK = 256  # eyes per generator and per render call: numpy temporaries stay a few MB
HAND_BLOCK = 16
MIN_HAND_SIZE = 32  # smaller and the fingers (8-11 mm) are under a pixel wide
SPLITS = {"synthetic": "synthetic", "real": "real", "real_test": "real"}  # split → domain
LABELED_SPLITS = ("synthetic", "real_test")


def block_rng(seed: int, kind: str, split: str, block: int) -> np.random.Generator:
    codes = (list(LAYOUTS).index(kind), list(SPLITS).index(split))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *codes, block])))


def render_rows(kind: str, split: str, seed: int, start: int, stop: int,
                appearance: tuple[str, ...] | None = None, hand_size: int = HAND_SIZE) -> dict[str, np.ndarray]:
    """Rows [start, stop) of a split as a batch for the writer (labels only for labeled splits).

    `appearance` re-renders the same rows, ids and labels with the real appearance: for eyes
    those parts of it (see `add_real_eye_appearance`), for hands the Kinect artifacts
    (`appearance=()` none, anything else all). `render_rows("eye", "synthetic", seed, 0, n,
    APPEARANCE_PARTS)` is the appearance oracle, a perfect appearance-only refiner;
    `render_rows("hand", "synthetic", seed, 0, n, ("kinect",))` is the depth one.
    `hand_size`: the side of a hand depth map in pixels (`render_hands`).
    """
    if kind not in RENDERERS:
        raise ValueError(f"kind must be one of {sorted(RENDERERS)}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    reuse_freed_memory()
    block = BLOCK if kind == "eye" else HAND_BLOCK
    parts = []
    for b in range(start // block, -(-stop // block)):
        lo, hi = b * block, (b + 1) * block
        rng = block_rng(seed, kind, split, b)
        if kind == "hand":
            images, labels = render_hands(rng, block, SPLITS[split], hand_size,
                                          None if appearance is None else bool(appearance))
        else:
            images, labels = render_eyes(rng, block, SPLITS[split], appearance)
        keep = slice(max(start, lo) - lo, min(stop, hi) - lo)
        parts.append({"image": images[keep], **({k: v[keep] for k, v in labels.items()}
                                                if split in LABELED_SPLITS else {})})
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    batch["id"] = np.array([f"{split}-{seed}-{i:09d}" for i in range(start, stop)], dtype=object)
    batch["source"] = f"simulate:{kind}:{split}"
    return batch


def split_layout(kind: str, split: str, hand_size: int = HAND_SIZE) -> Layout:
    layout = hand_layout(hand_size) if kind == "hand" else LAYOUTS[kind]
    labels = layout.label_fields if split in LABELED_SPLITS else {}
    return Layout(layout.image_shape, layout.image_dtype, labels)


def _render_shard(uri: str, kind: str, split: str, seed: int, index: int, start: int, stop: int,
                  storage_cfg: StorageConfig | None, hand_size: int = HAND_SIZE) -> ShardInfo:
    layout = split_layout(kind, split, hand_size)
    rows = layout.check_batch(render_rows(kind, split, seed, start, stop, hand_size=hand_size),
                              f"simulate:{kind}:{split}")
    return write_shard(uri, index, layout, rows, storage_cfg)


def simulate_dataset(out_uri: str, synthetic: int, real: int, real_test: int, seed: int = 0, kind: str = "eye",
                     rows_per_shard: int = 50_000, storage_cfg: StorageConfig | None = None,
                     parallel: bool | None = None, progress: bool = False,
                     overwrite: bool = False, hand_size: int = HAND_SIZE) -> dict[str, int]:
    """Write `out/synthetic`, `out/real` and `out/real_test`; returns rows per split.

    `hand_size`: the side of hand depth maps in pixels (224, NYU's crops; 64 for CPUs).

    Existing splits are refused unless `overwrite`. Each shard is rendered and written to
    its split's staging folder by its own task; the driver commits each split once all of
    its shards exist (see `writer.commit`). `parallel=None` uses Ray tasks
    when there is more than one shard's worth of rows, and renders in-process otherwise.
    """
    if kind not in LAYOUTS:
        raise ValueError(f"kind must be one of {sorted(LAYOUTS)}, got {kind!r}")
    if kind == "hand" and not MIN_HAND_SIZE <= hand_size <= HAND_SIZE:
        raise ValueError(f"--hand-size must be within {MIN_HAND_SIZE}..{HAND_SIZE} pixels, got {hand_size}")
    counts = {"synthetic": synthetic, "real": real, "real_test": real_test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"{split}: row count must be >= 0, got {n}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    storage_cfg = storage.effective_config(storage_cfg)
    if not storage.is_s3(out_uri):  # Ray tasks write from their own working folders
        out_uri = storage.resolve(out_uri)[1]
    if parallel is None:
        parallel = sum(counts.values()) > rows_per_shard
    # Ray tasks get the credentials through their environment, never as arguments.
    task_cfg = storage.without_secrets(storage_cfg) if parallel else storage_cfg
    tasks = []
    # Every split is checked before anything is rendered, so a refusal costs nothing.
    staging = {split: prepare_output(storage.join(out_uri, split), storage_cfg, overwrite) for split in counts}
    for split, n in counts.items():
        for index, start in enumerate(range(0, n, rows_per_shard)):
            tasks.append((staging[split], kind, split, seed, index, start, min(start + rows_per_shard, n), task_cfg,
                          hand_size))
    if parallel:
        from simgan_dist.data.pipeline import parallel_map

        results = parallel_map(_render_shard, tasks, desc=f"simulate {kind}", weights=[t[6] - t[5] for t in tasks],
                               progress=progress, env=storage.worker_env(storage_cfg))
    else:
        results = _run_local(tasks, progress)
    for split in counts:
        shards = [info for task, info in zip(tasks, results, strict=True) if task[2] == split]
        manifest = make_manifest(split_layout(kind, split, hand_size), shards, kind=split, source=f"simulate:{kind}",
                                 extra={"seed": seed, "simulator": kind, "domain": SPLITS[split],
                                        **({"gaze_convention": GAZE_CONVENTION} if kind == "eye" else {})})
        commit(storage.join(out_uri, split), staging[split], manifest, storage_cfg)
    return counts


def _run_local(tasks: list[tuple], progress: bool) -> list[ShardInfo]:
    from tqdm import tqdm

    with tqdm(total=sum(t[6] - t[5] for t in tasks), unit="img", disable=not progress) as bar:
        results = []
        for task in tasks:
            results.append(_render_shard(*task))
            bar.update(task[6] - task[5])
    return results


def cli_simulate(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    total = args.synthetic + args.real + args.real_test
    start = time.perf_counter()
    counts = simulate_dataset(args.out, args.synthetic, args.real, args.real_test, seed=args.seed, kind=args.kind,
                              rows_per_shard=args.rows_per_shard, storage_cfg=cfg.storage,
                              progress=total >= 20_000, overwrite=args.overwrite, hand_size=args.hand_size)
    seconds = time.perf_counter() - start
    for split, n in counts.items():
        print(f"{storage.join(args.out, split)}: {n} rows")
    print(f"simulated {total} {args.kind} images in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} images/s)")
    return 0


def render_throughput(kind: str = "eye", n: int = 8192, domain: str = "real") -> float:
    """Images per second of the renderer alone on one core (for the benchmark and the docs)."""
    reuse_freed_memory()
    rng = np.random.default_rng(0)
    block = BLOCK if kind == "eye" else HAND_BLOCK
    start = time.perf_counter()
    for _ in range(math.ceil(n / block)):
        RENDERERS[kind](rng, block, domain)
    return math.ceil(n / block) * block / (time.perf_counter() - start)
