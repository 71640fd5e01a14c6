"""The sweep's results: one row per trial, written as results.csv / results.md, and the winner's files.

best_config.yaml is the winning trial's config (redacted) and best_checkpoint.txt its chosen
checkpoint, which `refine --checkpoint SWEEP_FOLDER` reads.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any

from simgan_dist.config import Config
from simgan_dist.console import failure_line
from simgan_dist.metrics.objective import BEST_CHECKPOINT_FILE, SCORE_KEYS, best_checkpoint
from simgan_dist.tune_judge import JUDGE_KEYS, rank_key
from simgan_dist.tune_space import PARAMS, apply_params, sweep_folder, total_steps, trial_config


def trial_row(result, cfg: Config) -> dict[str, Any]:
    """One trial's line of the results table, with its best scored checkpoint."""
    params = {key: result.config[key] for key in PARAMS}
    trial_id = os.path.basename(result.path).split("_")[-3] if result.path else ""
    history = result.metrics_dataframe
    row: dict[str, Any] = {"trial": result.metrics.get("trial_id", trial_id), **params}
    scored = history[history["objective"].notna()] if history is not None and "objective" in history else None
    if scored is not None and len(scored):
        best = scored.loc[scored["objective"].idxmin()]
        row.update({key: float(best[key]) for key in SCORE_KEYS}, best_step=int(best["step"]),
                   last_step=int(scored["step"].max()))
    else:
        row.update({key: math.nan for key in SCORE_KEYS}, best_step=-1, last_step=-1)
    if result.error:
        row["stop"] = f"failed: {failure_line(result.error)[:160]}"
    elif row["last_step"] < total_steps(apply_params(cfg, params)):
        row["stop"] = "stopped at a rung"
    else:
        row["stop"] = "completed"
    run = trial_config(cfg.to_dict(), params, row["trial"])
    from simgan_dist.data import storage

    found = best_checkpoint(storage.join(run.train.storage_path, run.train.name), cfg.storage) \
        if not math.isnan(row["objective"]) else None
    row["checkpoint"] = found[0] if found else ""
    if found:  # the trial's scores are those of the checkpoint refine would take (objective.choose)
        row.update({key: float(found[1][key]) for key in SCORE_KEYS if key in found[1]}, best_step=found[1]["step"])
    return row


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_results(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """results.csv, results.md, best_config.yaml and best_checkpoint.txt under the sweep folder."""
    from simgan_dist.data import storage

    folder = sweep_folder(cfg)
    rows = sorted(rows, key=rank_key)
    columns = ["trial", *PARAMS, *JUDGE_KEYS, *SCORE_KEYS, "best_step", "last_step", "stop", "checkpoint"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    # a score a trial lacks is an empty cell, the null that pandas, pyarrow, DuckDB and Spark read by default
    writer.writerows([{c: "" if _missing(r[c]) else r[c] for c in columns} for r in rows])
    storage.write_bytes_atomic(storage.join(folder, "results.csv"), text.getvalue().encode(), cfg.storage)

    def cell(value: Any) -> str:
        return "–" if _missing(value) else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"# Sweep {cfg.tune.name}", "", "Completed eye trials ranked by spread_ratio (lower = better: a gaze "
             "estimator trained on the trial's refined eyes, its scatter on held-out real eyes over its scatter on its "
             "own; simgan_dist/tune_judge.py), then the rest by the label-free objective (lower = better; realism / "
             "realism(synthetic) + drift beyond the tolerance, simgan_dist/metrics/objective.py).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    storage.write_bytes_atomic(storage.join(folder, "results.md"), ("\n".join(lines) + "\n").encode(), cfg.storage)
    best = next((r for r in rows if r["checkpoint"]), None)
    if best is None:
        return None
    winner = apply_params(cfg, best)  # a redacted copy
    winner.train.name = f"{cfg.tune.name}-best"
    storage.write_bytes_atomic(storage.join(folder, "best_config.yaml"), winner.to_yaml().encode(), cfg.storage)
    storage.write_bytes_atomic(storage.join(folder, BEST_CHECKPOINT_FILE), (best["checkpoint"] + "\n").encode(),
                               cfg.storage)
    return best
