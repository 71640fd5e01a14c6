"""The rung book: ASHA's rule, and in ordered mode the same verdicts whatever order trials report in."""

import random
from types import SimpleNamespace

import pytest

from simgan_dist.train.rungs import RungBook, milestones, rung_steps, trial_index

GRACE, FACTOR, TOTAL = 100, 2, 1000
RUNGS = milestones(GRACE, FACTOR, TOTAL)


def _objectives(seed: int, trials: int) -> dict[tuple[int, int], float]:
    rng = random.Random(seed)
    return {(t, m): rng.uniform(0, 1) for t in range(trials) for m in RUNGS}


def _ray_asha_sequential(objectives, trials: int) -> dict[str, bool]:
    """Ray Tune's own ASHA bracket, the trials run one after the other (the order a sequential sweep reports in)."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket, verdicts = _Bracket(GRACE, TOTAL, FACTOR, 0, stop_last_trials=False), {}
    for t in range(trials):
        trial = SimpleNamespace(trial_id=str(t))
        for m in RUNGS:  # ASHA maximises: Tune hands it -objective in mode "min"
            verdicts[f"{t}@{m}"] = bracket.on_result(trial, m, -objectives[t, m]) == "CONTINUE"
            if not verdicts[f"{t}@{m}"]:
                break
    return verdicts


def _run(book: RungBook, objectives, trials: int, rng: random.Random) -> dict[str, bool]:
    """Trials advance in a random interleaving; a trial waits at a rung while its verdict is pending."""
    at = dict.fromkeys(range(trials), 0)  # trial -> index of its next rung
    while at:
        trial = rng.choice(sorted(at))
        m = RUNGS[at[trial]]
        book.record(trial, m, objectives[trial, m])
        verdict, _ = book.verdict(trial, m)
        if verdict is None:
            continue
        if verdict and at[trial] + 1 < len(RUNGS):
            at[trial] += 1
        else:
            del at[trial]
            book.end(trial)
    return book.verdicts


@pytest.mark.parametrize("seed", range(5))
def test_ordered_book_decides_as_a_sequential_asha_sweep_in_any_report_order(seed):
    trials = 7
    objectives = _objectives(seed, trials)
    expected = _ray_asha_sequential(objectives, trials)
    assert not all(expected.values())  # the case stops trials
    for order in range(10):
        assert _run(RungBook(FACTOR, ordered=True), objectives, trials, random.Random(order)) == expected


def test_unordered_book_is_asha_and_depends_on_who_reports_first():
    objectives = {(0, m): 0.2 for m in RUNGS} | {(1, m): 0.8 for m in RUNGS}
    first_good = RungBook(FACTOR, ordered=False)
    first_good.record(0, GRACE, 0.2)
    first_good.record(1, GRACE, 0.8)
    assert first_good.verdict(1, GRACE) == (False, [])  # worse than the one before it
    first_bad = RungBook(FACTOR, ordered=False)
    first_bad.record(1, GRACE, objectives[1, GRACE])
    first_bad.record(0, GRACE, objectives[0, GRACE])
    assert first_bad.verdict(1, GRACE) == (True, [])  # nothing recorded before it: ASHA lets it go on


def test_a_trial_waits_for_earlier_trials_until_they_reach_the_rung_or_end():
    book = RungBook(FACTOR, ordered=True)
    book.record(2, GRACE, 0.5)
    assert book.verdict(2, GRACE) == (None, [0, 1])
    book.record(0, GRACE, 0.9)
    assert book.verdict(2, GRACE) == (None, [1])
    book.end(1)  # failed before the rung: nothing to wait for
    assert book.verdict(2, GRACE) == (True, [])
    assert book.verdict(3, GRACE) == (None, [])  # trial 3 has not recorded: nobody knows yet
    book.record(3, GRACE, float("nan"))  # a non-finite objective never goes on
    assert book.verdict(3, GRACE) == (False, []) and 3 in book.ended


def test_a_restarted_trial_reporting_a_rung_again_changes_nothing_and_the_book_survives_json():
    book = RungBook(FACTOR, ordered=True)
    assert book.record(0, GRACE, 0.4) and not book.record(0, GRACE, 0.1)
    book.record(1, GRACE, 0.6)
    assert book.verdict(1, GRACE) == (False, [])
    again = RungBook.from_json(book.to_json())
    assert again == book and again.verdict(1, GRACE) == (False, [])


def test_rungs_fall_on_the_first_evaluation_at_or_after_each_milestone():
    assert milestones(100, 2, 1000) == [100, 200, 400, 800]
    assert milestones(700, 2, 1310) == [700]  # the demo's sweep: one rung
    assert rung_steps(100, 2, 1000, eval_every=30) == {120: 100, 210: 200, 420: 400, 810: 800}
    assert rung_steps(100, 3, 1000, eval_every=500) == {500: 300}  # two milestones at one evaluation: the higher
    assert rung_steps(900, 2, 1000, eval_every=500) == {}  # decided at the last step: the trial ends anyway
    assert trial_index("0d19a_00012") == 12
