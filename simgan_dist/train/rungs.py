"""Successive halving for a sweep's trials (ASHA's rule), decided the same whatever order trials report in.

ASHA (Li et al., 2020) stops a trial at a rung (a step count) when its objective is not within the best
1/reduction_factor of the values recorded at that rung before it; with trials running at once, which
values came before depends on timing. Here the trials' workers stop at each rung and ask the sweep's
rung book (an actor on the driver's node) for the verdict:

- `train.deterministic` (random or grid search): a trial is compared with the trials created before it
  only (lower index), once each of them has reached the rung or ended. That is what ASHA decides when
  the trials run one at a time, so a sweep with concurrent trials decides as a sequential one would,
  and the same sweep twice decides the same. A trial may wait at a rung for an earlier, slower trial.
- otherwise (and with optuna, whose trials have no creation index): ASHA as is, against what was
  recorded before, at once.

A stopped trial ends itself at the rung, its last checkpoint whole. The book is written to
`<sweep>/_rungs.json` at each change, so a resumed sweep goes on deciding as the interrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RUNGS_FILE = "_rungs.json"
POLL_S = 0.5


def milestones(grace_steps: int, reduction_factor: int, total_steps: int) -> list[int]:
    """ASHA's rungs: grace × factor^k, those before a trial's last step (a trial that gets there ends anyway)."""
    out, step = [], grace_steps
    while step < total_steps:
        out.append(step)
        step *= reduction_factor
    return out


def rung_steps(grace_steps: int, reduction_factor: int, total_steps: int, eval_every: int) -> dict[int, int]:
    """evaluated step -> the rung decided there: the first evaluation at or after each milestone
    (several milestones at one evaluation: the highest, as ASHA records one per result)."""
    out: dict[int, int] = {}
    for milestone in milestones(grace_steps, reduction_factor, total_steps):
        step = -(-milestone // eval_every) * eval_every
        if step < total_steps:
            out[step] = milestone
    return out


@dataclass
class RungBook:
    """The rungs' records and verdicts. Trials are keyed by their index (creation order)."""

    reduction_factor: int
    ordered: bool
    values: dict[int, dict[int, float]] = field(default_factory=dict)  # milestone -> trial -> objective
    ended: set[int] = field(default_factory=set)  # trials that reach no further rung
    verdicts: dict[str, bool] = field(default_factory=dict)  # "trial@milestone" -> goes on

    def record(self, trial: int, milestone: int, objective: float) -> bool:
        """A trial's objective at a rung; a restarted trial reporting the rung again changes nothing.
        Returns whether the book changed."""
        rung = self.values.setdefault(milestone, {})
        if trial in rung:
            return False
        objective = objective if math.isfinite(objective) else math.inf
        if not self.ordered:  # ASHA: against what came before, decided now
            self._decide(trial, milestone, objective, list(rung.values()))
        rung[trial] = objective
        return True

    def end(self, trial: int) -> bool:
        if trial in self.ended:
            return False
        self.ended.add(trial)
        return True

    def verdict(self, trial: int, milestone: int) -> tuple[bool | None, list[int]]:
        """(True: go on, False: stop, None: not yet), and the earlier trials still awaited."""
        key = f"{trial}@{milestone}"
        if key in self.verdicts:
            return self.verdicts[key], []
        rung = self.values.get(milestone, {})
        if trial not in rung:
            return None, []
        waiting = [j for j in range(trial) if j not in rung and j not in self.ended]
        if waiting:
            return None, waiting
        self._decide(trial, milestone, rung[trial], [rung[j] for j in range(trial) if j in rung])
        return self.verdicts[key], []

    def _decide(self, trial: int, milestone: int, objective: float, before: list[float]) -> None:
        goes_on = math.isfinite(objective) and (
            not before or objective <= float(np.percentile(np.minimum(before, 1e300), 100 / self.reduction_factor)))
        self.verdicts[f"{trial}@{milestone}"] = goes_on
        if not goes_on:
            self.ended.add(trial)

    def to_json(self) -> str:
        return json.dumps({"reduction_factor": self.reduction_factor, "ordered": self.ordered,
                           "values": {str(m): {str(t): v for t, v in rung.items()} for m, rung in self.values.items()},
                           "ended": sorted(self.ended), "verdicts": self.verdicts}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RungBook:
        state = json.loads(text)
        return cls(state["reduction_factor"], state["ordered"],
                   {int(m): {int(t): float(v) for t, v in rung.items()} for m, rung in state["values"].items()},
                   set(state["ended"]), state["verdicts"])


def trial_index(trial_id: str) -> int:
    """Tune's random and grid searches name trials `<prefix>_<5-digit creation index>`."""
    return int(trial_id.rsplit("_", 1)[1])


def book_name(sweep_folder: str) -> str:
    """One book per sweep folder (two sweeps of one name elsewhere are two sweeps)."""
    return f"simgan-rungs-{hashlib.sha1(sweep_folder.encode()).hexdigest()[:12]}"


def start_book(folder: str, storage_cfg, reduction_factor: int, ordered: bool):
    """The sweep's rung book actor on this (the driver's) node, restored from the sweep folder if written there;
    restarted likewise if its process dies."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class RungBookActor:
        def __init__(self):
            from simgan_dist.data import storage

            self.uri = storage.join(folder, RUNGS_FILE)
            try:
                self.book = RungBook.from_json(storage.read_bytes(self.uri, storage_cfg).decode())
            except storage.MissingFileError:
                self.book = RungBook(reduction_factor, ordered)

        def _save(self, changed: bool) -> None:
            from simgan_dist.data import storage

            if changed:
                storage.write_bytes_atomic(self.uri, self.book.to_json().encode(), storage_cfg)

        def record(self, trial: int, milestone: int, objective: float) -> None:
            self._save(self.book.record(trial, milestone, objective))

        def end(self, trial: int) -> None:
            self._save(self.book.end(trial))

        def verdict(self, trial: int, milestone: int) -> tuple[bool | None, list[int]]:
            decided = len(self.book.verdicts)
            answer = self.book.verdict(trial, milestone)
            self._save(len(self.book.verdicts) != decided)
            return answer

    return RungBookActor.options(
        name=book_name(folder), get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote()


@dataclass
class RungStop:
    """A trial's workers' side: at each rung step rank 0 records the objective, every rank waits for the
    verdict (polling the book, never inside a collective: an earlier trial may take hours to get there)."""

    book: Any
    trial: int
    steps: dict[int, int]  # evaluated step -> milestone

    @classmethod
    def attach(cls, rungs: dict[str, Any] | None, cfg, total_steps: int) -> RungStop | None:
        """`rungs`: {"book": the actor's name, "trial": this trial's index}, given to sweeps' trials only."""
        if not rungs:
            return None
        import ray

        return cls(ray.get_actor(rungs["book"]), rungs["trial"],
                   rung_steps(cfg.tune.grace_steps, cfg.tune.reduction_factor, total_steps, cfg.train.eval_every))

    def record(self, step: int, objective: float) -> None:
        import ray

        if step in self.steps:
            ray.get(self.book.record.remote(self.trial, self.steps[step], objective))

    def goes_on(self, step: int, say=None) -> bool:
        """Whether the trial goes on past `step` (True where it is no rung); `say`: rank 0's console."""
        import ray

        if step not in self.steps:
            return True
        said = False
        while True:
            verdict, waiting = ray.get(self.book.verdict.remote(self.trial, self.steps[step]))
            if verdict is not None:
                return verdict
            if say and waiting and not said:
                say(f"step {step}: waits at this rung for earlier trial(s) {waiting} to reach it "
                    "(train.deterministic: decided as if the trials ran one at a time)")
                said = True
            time.sleep(POLL_S)
