"""The sweep's final ranking (eyes): each completed trial judged by `metrics.spread` on its chosen checkpoint.

The objective (realism + drift) is cheap enough for every evaluation: it picks each trial's checkpoint
and stops lagging trials at rungs. It does not rank finished trials like the downstream gaze error
(Spearman 0.37 over 10 trials); the spread of a gaze estimator trained on a trial's refined eyes does
(bench/RESULTS.md, issue 23 6b.), but it fits an estimator, so it runs once per completed trial, after the
trials, as Ray tasks (a GPU each on a GPU cluster). All trials are judged with the sweep's seed: the
estimator's initialisation is the same for every candidate. Trials stopped at a rung or failed are not
judged and rank after the judged ones, by objective, and so does a trial whose judging failed (a warning
says why); hand depth maps (no validated judge yet) and eyes without gaze labels rank by objective alone.
"""

from __future__ import annotations

import math
from typing import Any

from simgan_dist.config import Config
from simgan_dist.console import failure_line, say

JUDGE_KEYS = ("spread", "spread_ratio")
JUDGED = "spread_ratio"  # the judge's score: the estimator's scatter on real eyes over its scatter on its own


def judge_applies(cfg: Config) -> bool:
    """Eyes whose synthetic corpus has gaze labels (the judge trains a gaze estimator on them)."""
    from simgan_dist.data.schema import read_manifest

    return cfg.model.architecture == "eye" and "gaze" in read_manifest(cfg.data.synthetic, cfg.storage).label_fields


def judge_checkpoint(cfg: Config, checkpoint: str, threads: int | None = None) -> dict[str, float]:
    """The spread judge's scores of one checkpoint: it refines the first SPREAD_ROWS labeled synthetic eyes,
    an estimator learns from them, and scatters over the held-out real eyes (`data.real_val`, or
    `data.real_val_fraction` of `data.real`; never real_test)."""
    import torch

    from simgan_dist.core.imaging import refine_images
    from simgan_dist.data.schema import load_numpy
    from simgan_dist.data.splits import load_real_val
    from simgan_dist.metrics.estimators import device
    from simgan_dist.metrics.spread import SPREAD_ROWS, refined_spread
    from simgan_dist.train.checkpoint import load_refiner

    if threads:
        torch.set_num_threads(threads)
    where = device()
    rows = load_numpy(cfg.data.synthetic, cfg.storage, columns=["image", "gaze"], limit=SPREAD_ROWS)
    refiner, _ = load_refiner(checkpoint, cfg.storage, where)
    refined = refine_images(refiner, rows["image"], device=where)
    return refined_spread(refined, rows["gaze"], load_real_val(cfg, SPREAD_ROWS), seed=cfg.train.seed)


def judge_trials(cfg: Config, rows: list[dict[str, Any]]) -> None:
    """Add the judge's scores (JUDGE_KEYS; NaN where not judged) to the results rows, in place."""
    import ray

    from simgan_dist.ray_cluster import estimator_task_options

    for row in rows:
        row.update(dict.fromkeys(JUDGE_KEYS, math.nan))
    todo = [row for row in rows if row["stop"] == "completed" and row["checkpoint"]]
    if not todo or not judge_applies(cfg):
        return
    say(f"tune: judging {len(todo)} completed trial(s): a gaze estimator trained on each one's refined eyes, "
        f"its scatter on held-out real eyes")
    options, threads = estimator_task_options(len(todo))
    remote = ray.remote(judge_checkpoint).options(**options, max_retries=1)
    shared = ray.put(cfg)  # the storage credentials travel in the object store, as the trials' do
    refs = [remote.remote(shared, row["checkpoint"], threads) for row in todo]
    for row, ref in zip(todo, refs, strict=True):
        try:
            scores = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the trials' results stand: this one ranks by objective
            say(f"tune: warning: trial {row['trial']} could not be judged ({failure_line(exc)[:200]}); it ranks "
                f"after the judged trials, by objective")
            continue
        row.update({key: scores[key] for key in JUDGE_KEYS})
        say(f"tune: trial {row['trial']}: spread {scores['spread']:.2f}° on real eyes, "
            f"{scores['spread_ratio']:.3f} of its own ({scores['spread_s']:.0f} s)")
        if scores["underfit"]:
            say(f"tune: warning: trial {row['trial']}'s judge estimator did not learn its refined eyes (scatter "
                f"{scores['fit_spread']:.1f}° on them, the labels' {scores['label_spread']:.1f}°): the refiner may "
                f"have erased the gaze, or the corpus is too small for the judge; its rank says little")


def rank_key(row: dict[str, Any]) -> tuple:
    """Results order: judged trials by the judge's score, then the rest by objective (NaN last)."""
    judged = not math.isnan(row.get(JUDGED, math.nan))
    score = row[JUDGED] if judged else row["objective"]
    return (not judged, math.isnan(score), score)
