"""What a sweep prints (`simgan-dist tune`): our own line per trial event, in place of Tune's status
table and its traceback of a failed trial (those come with --verbose)."""

from __future__ import annotations

import math

from simgan_dist.console import failure_line, say


def sweep_progress(max_failures: int):
    from ray.tune import Callback

    class SweepProgress(Callback):
        """Our own console lines for a sweep: a trial's start, each scored report, a restart and where
        it resumed, its end (Tune's table and its traceback of a failed trial: --verbose)."""

        def __init__(self):
            self.resumed_at: dict[str, int] = {}

        @staticmethod
        def _name(trial) -> str:
            return f"trial {trial.trial_id} (k_g={trial.config['k_g']}, lr={trial.config['lr']:.3g}, " \
                   f"λ={trial.config['lambda_reg']:.3g})"

        def on_trial_start(self, iteration, trials, trial, **info):
            say(f"tune: {self._name(trial)} started")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            restored = result.get("restored_from_step") or 0
            if restored and self.resumed_at.get(trial.trial_id) != restored:
                self.resumed_at[trial.trial_id] = restored
                say(f"tune: trial {trial.trial_id} resumed at step {restored} with "
                    f"{result.get('history_restored', 0)} history images")
            if "objective" in result:
                say(f"tune: trial {trial.trial_id} step {result.get('step')}: objective {result['objective']:.4g} "
                    f"± {result.get('objective_se', math.nan):.2g} (realism {result.get('realism', math.nan):.4g}, "
                    f"drift {result.get('drift', math.nan):.3g} px)")

        def on_trial_recover(self, iteration, trials, trial, **info):
            error = trial.get_pickled_error()
            why = failure_line(error)[:160] if error else "its process was lost"
            say(f"tune: {self._name(trial)} failed ({why}); restarting it from its latest checkpoint "
                f"(restart {trial.num_failures} of {max_failures})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            say(f"tune: {self._name(trial)} ended at step {trial.last_result.get('step')}")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"tune: {self._name(trial)} failed (Tune keeps its error file under the sweep folder)")

    return SweepProgress()
