"""Choose a finished demo sweep's checkpoint again, with today's rule, as the sweep itself would have.

    python bench/rechoose.py DEMO_OUT [DEMO_OUT ...] [--keep-best 10]

For demo runs made with every checkpoint kept (`DEMO_SET="train.keep_best=100" bash jobs/demo.sh OUT`):
training is deterministic (`train.deterministic`) and checkpoint retention never changes it, so the
trials are those a run with `train.keep_best=K` makes. This keeps what such a run keeps in each trial
(the K lowest-objective scored checkpoints and the latest; the others are deleted), then does what
`simgan-dist tune` does at its end: each trial's checkpoint by `objective.best_checkpoint`, the
winner by that checkpoint's objective, written to the sweep's `best_checkpoint.txt`; the earlier
choice's refined corpus and report move aside (`data/refined.earlier`, `report.earlier`). Then refine
and evaluate with `FROM_STEP=3 bash jobs/demo.sh DEMO_OUT`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from simgan_dist.metrics.objective import BEST_CHECKPOINT_FILE, SCORES_FILE, best_checkpoint


def keep_like_a_run(trial: Path, keep_best: int) -> None:
    folders = sorted(f for f in trial.glob("checkpoint_*") if f.is_dir())
    scored = sorted((json.loads((f / SCORES_FILE).read_text())["objective"], f.name) for f in folders
                    if (f / SCORES_FILE).exists())
    keep = {name for _, name in scored[:keep_best]} | {folders[-1].name}
    for folder in folders:
        if folder.name not in keep:
            shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+")
    parser.add_argument("--keep-best", type=int, default=10)
    args = parser.parse_args()
    for demo in map(Path, args.demos):
        sweep = demo / "sweeps" / "demo"
        chosen = []
        for trial in sorted((sweep / "runs").iterdir()):
            keep_like_a_run(trial, args.keep_best)
            found = best_checkpoint(str(trial))
            if found:
                chosen.append((found[1]["objective"], found[0], found[1]))
        objective, checkpoint, scores = min(chosen)
        (sweep / BEST_CHECKPOINT_FILE).write_text(checkpoint + "\n")
        for earlier in (demo / "data" / "refined", demo / "report"):
            if earlier.exists():
                earlier.rename(earlier.with_name(earlier.name + ".earlier"))
        print(f"{demo}: {checkpoint} (step {scores['step']}, objective {objective:.4f} ± "
              f"{scores.get('objective_se', 0):.3f})")


if __name__ == "__main__":
    main()
