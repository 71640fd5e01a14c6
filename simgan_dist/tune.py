"""`simgan-dist tune`: a Ray Tune sweep over K_g, learning rate and λ, ranked without real labels.

Each trial is a whole training run: a Tune function trainable builds and fits a Ray Train
`TorchTrainer` (`train.fit`) with its own worker group and its own history-buffer actors,
named after the trial. Ray Train's `TuneReportCallback` forwards every scored report
(`objective`, `realism`, `drift`, the step and the checkpoint path) to Tune. Successive halving
(ASHA's rule, `train/rungs.py`) stops trials whose objective lags at a rung: the trial's workers
ask the sweep's rung book and end the run themselves there, so a stopped trial's last checkpoint
is whole and its worker group shuts down as any finished run's does; with `train.deterministic` the
verdicts do not depend on which trial reports first. When the trials are done, each completed eye
trial's chosen checkpoint is judged once by the spread of a gaze estimator trained on its refined eyes
(`tune_judge.py`), which ranks trials like the downstream error where the objective does not.
The history actors go away when a trial ends (`train.fit`'s `finally`; `TrialCleanup` on the driver
for a trial whose process died), and so does the placement group of a dead trial's worker group, which
Ray would otherwise keep until the sweep ends.

Everything goes under `tune.output/tune.name/`: Tune's experiment state (rerunning the same
sweep resumes it with `Tuner.restore`, finished trials are not rerun), each trial's training
run in `runs/<trial>/`, and the sweep's results:

    _rungs.json                the rung book: each trial's objective at each rung and the verdicts
    results.csv / results.md   one row per trial, best first: parameters, spread judge, objective, realism, drift, stop
    best_config.yaml           the winner's config: `simgan-dist train --config best_config.yaml`
    best_checkpoint.txt        the winner's best checkpoint (`refine --checkpoint` takes the sweep folder)

Tune's param space holds only K_g, lr and λ (what its status table and params.json show). The
sweep's base config, redacted like every serialised Config, and the storage credentials reach
each trial's process through the object store (`tune.with_parameters`); `train.fit` passes the
credentials on to its workers (`share_env`).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

from simgan_dist.config import Config, config_from_dict, load_config
from simgan_dist.console import say, verbose
from simgan_dist.errors import UserError
from simgan_dist.train import rungs
from simgan_dist.tune_judge import judge_trials, rank_key
from simgan_dist.tune_progress import sweep_progress
from simgan_dist.tune_results import trial_row, write_results
from simgan_dist.tune_space import redacted, search_space, sweep_folder, total_steps, trial_config, trial_count

# What a trial's own process holds: it only drives its worker group (Tune refuses an empty request).
TRIAL_CPUS = 0.01
ORPHAN_CHECK_S = 5.0  # how often the driver looks for a stopped trial's placement group


class TuneError(UserError, ValueError):
    """A sweep that cannot run as configured; the message names the key."""


def _scored_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoredReportCallback(TuneReportCallback):
        """Forward to Tune only the reports that carry a fresh evaluation (the results table ranks their objectives)."""

        def after_report(self, run_context, metrics, checkpoint):
            objective = metrics[0].get("objective")
            if objective is not None and math.isfinite(objective):
                super().after_report(run_context, metrics, checkpoint)

    return ScoredReportCallback()


def trial_key(cfg: Config, trial_id: str) -> int:
    """A trial's index in the rung book: its creation index (random and grid search); optuna's
    trials have none (random ids), and there the book decides as ASHA does, order unseen."""
    return int(trial_id, 16) if cfg.tune.search == "optuna" else rungs.trial_index(trial_id)


def run_trial(config: dict[str, Any], base: dict[str, Any], worker_resources: dict[str, float] | None = None,
              env: dict[str, str] | None = None, mlflow_parent: str | None = None) -> None:
    """Tune function trainable: one training run with this trial's parameters, its workers sized
    by the sweep (`sweep_resources`) so that concurrent trials and their Ray Data tasks fit.

    `env`: the storage settings as AWS_* variables (`storage.worker_env`) and the MLflow ones
    (`tracking.worker_env`), given through `tune.with_parameters` (the object store), never in `config`,
    which Tune writes to disk. `mlflow_parent`: the sweep's MLflow run, parent of the trial's.
    """
    import ray.tune

    from simgan_dist.train.driver import fit

    os.environ.update(env or {})  # this trial's own process; fit() hands them on to its workers
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, config, trial_id)
    result = fit(cfg, callbacks=[_scored_report_callback()], worker_resources=worker_resources,
                 mlflow_parent=mlflow_parent,
                 rungs={"book": rungs.book_name(sweep_folder(cfg)), "trial": trial_key(cfg, trial_id)})
    if result.error:
        raise result.error


def _trial_cleanup(base: dict[str, Any]):
    import ray
    from ray.tune import Callback

    from simgan_dist.ray_cluster import remove_orphaned_placement_groups
    from simgan_dist.train import distributed_history as dh
    from simgan_dist.train.driver import history_run_id

    class TrialCleanup(Callback):
        """On the driver: what a trial's dead process leaves behind goes away, and the rung book hears
        of trials that end (no later trial waits at a rung for them).

        Its history actors when it completes or fails; its worker group's placement group
        (`remove_orphaned_placement_groups`) once the trial's process is gone, checked every
        ORPHAN_CHECK_S while the sweep runs (Tune kills a failed trial's process after its callbacks).
        """

        def __init__(self):
            self.last_check = time.monotonic()

        def _remove(self, trial) -> None:
            cfg = trial_config(base, trial.config, trial.trial_id)
            dh.destroy_shards(history_run_id(cfg), cfg.train.buffer_shards)
            # By name (this callback is pickled with the sweep's state; a handle would outlive its actor)
            book = ray.get_actor(rungs.book_name(sweep_folder(cfg)))
            ray.get(book.end.remote(trial_key(cfg, trial.trial_id)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._remove(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._remove(trial)

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last_check >= ORPHAN_CHECK_S:
                self.last_check = time.monotonic()
                for held in remove_orphaned_placement_groups():
                    if verbose():
                        say(f"tune: removed a stopped trial's placement group, freeing {held}")

    return TrialCleanup()


def default_concurrency(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials fit at once: a worker group's GPUs, or its CPUs plus one for its Ray Data readers
    plus what its history shard actors ask for (the same actors, with the same resources, as `train.fit`'s).

    (Without that spare CPU per trial, concurrent trials' dataset reads starve and every trial waits;
    without the shards' CPUs a trial's history actors wait for CPUs its workers hold.)
    GPU trials also need the least CPUs `resources.plan_workers` accepts.
    """
    from simgan_dist.train.resources import DATA_CPUS, MIN_WORKER_CPUS, MIN_WORKER_SHARE, history_cpus

    workers, cpus = cfg.train.num_workers, resources.get("CPU", 1)
    if cfg.train.use_gpu:
        least = max(workers * MIN_WORKER_CPUS + DATA_CPUS,
                    workers * MIN_WORKER_SHARE + DATA_CPUS + history_cpus(cfg) + TRIAL_CPUS)
        by_cpus = int(cpus // least)
        return max(1, min(int(resources.get("GPU", 0) // workers), by_cpus))
    return max(1, int(cpus // (workers + DATA_CPUS + history_cpus(cfg))))


def sweep_resources(cfg: Config) -> tuple[int, dict[str, float]]:
    """How many trials run at once and each trial's worker resources, on the connected cluster.

    The trials share the cluster evenly, each leaving its Ray Data readers a CPU and its history
    shard actors theirs (`resources.plan_workers`); a sweep that cannot fit fails here, before
    any trial starts.
    """
    import ray

    from simgan_dist.train import resources

    concurrency = cfg.tune.max_concurrent_trials or default_concurrency(cfg, ray.cluster_resources())
    try:
        plan = resources.training_resources(cfg, runs=concurrency, reserved_cpus=TRIAL_CPUS)
    except UserError as e:
        if concurrency == 1:
            raise
        asked = (f"tune.max_concurrent_trials={concurrency}" if cfg.tune.max_concurrent_trials
                 else "the default, as many as the cluster's GPUs fit")
        raise TuneError(f"{concurrency} trials at once ({asked}) do not fit: {e}; or lower "
                        "tune.max_concurrent_trials (0: as many as fit)") from None
    return concurrency, plan


def _check(cfg: Config) -> None:
    if not cfg.train.eval_every:
        raise TuneError("a sweep ranks trials by the label-free objective: set train.eval_every > 0")
    for key in ("synthetic", "real"):
        if not getattr(cfg.data, key):
            raise TuneError(f"data.{key} is not set: pass --set data.{key}=URI (made by simulate or ingest)")
    if cfg.tune.grace_steps > total_steps(cfg):
        raise TuneError(f"tune.grace_steps={cfg.tune.grace_steps} is longer than a trial "
                        f"({total_steps(cfg)} steps): lower it or raise train.iterations")


def trial_failure_config(cfg: Config):
    """How often Tune restarts a trial whose process was lost (its node preempted, say): as often as
    a run restarts its worker group (train.max_failures). A restarted trial calls `train.fit` with
    the same run name and folder, so it continues from its latest checkpoint.

    Where trials run: a trial's process holds only TRIAL_CPUS (the worker group holds the rest) and
    Ray places it on any node with that sliver free, spot nodes included; losing it restarts the
    trial as above. To keep coordinators off spot nodes, give the head or an on-demand group the
    spare CPUs (a 0-CPU head leaves them nothing)."""
    from ray import tune

    return tune.FailureConfig(max_failures=cfg.train.max_failures)


def make_tuner(cfg: Config, concurrency: int, worker_resources: dict[str, float] | None = None,
               mlflow_parent: str | None = None):
    """A new Tuner for the sweep, or the restored one when the sweep folder already holds its state.

    `concurrency` trials at once, each with `worker_resources` per training worker (`sweep_resources`);
    `mlflow_parent`: the sweep's MLflow run, which the trials' runs nest under.
    """
    from ray import tune

    from simgan_dist import tracking
    from simgan_dist.data import storage

    filesystem, storage_path = storage.resolve(cfg.tune.output, cfg.storage)
    if not storage.is_s3(cfg.tune.output):
        filesystem = None
    base = redacted(cfg).to_dict()
    # The trial only drives its worker group, which holds the CPUs/GPUs. Credentials go by
    # reference through the object store, not in the (written) param space.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, worker_resources=worker_resources,
                             env={**storage.worker_env(cfg.storage), **tracking.worker_env()},
                             mlflow_parent=mlflow_parent),
        {"CPU": TRIAL_CPUS})
    # Tune takes the sweep's path within `filesystem` (no s3:// scheme: pyarrow refuses a URI there)
    path, shown = storage.join(storage_path, cfg.tune.name), sweep_folder(cfg)
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        say(f"tune: resuming sweep {cfg.tune.name!r} from {shown}")
        return tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=filesystem)
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher, limit = OptunaSearch(seed=cfg.train.seed), concurrency
    else:  # random or grid, seeded: the same sweep config draws the same trials (it enforces the limit itself)
        from ray.tune.search.basic_variant import BasicVariantGenerator

        searcher, limit = BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=concurrency), None
    if not verbose():  # Tune's own status table and banners, and its traceback of each failed trial
        # (our line says why and what happens next): --verbose. The legacy reporter is silent at 0.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"
    say(f"tune: sweep {cfg.tune.name!r}: {trial_count(cfg)} trials, up to {concurrency} at once, "
        f"results in {shown}")
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric="objective", mode="min", num_samples=cfg.tune.num_samples,
                                    search_alg=searcher, max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=storage_path, storage_filesystem=filesystem,
                                  callbacks=[_trial_cleanup(base), sweep_progress(cfg.train.max_failures)],
                                  failure_config=trial_failure_config(cfg),
                                  verbose=1 if verbose() else 0),
    )


def sweep(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run (or resume) the sweep; returns the table's rows and the winning row."""
    import ray

    from simgan_dist import console, ray_cluster, tracking
    from simgan_dist.data import storage
    from simgan_dist.train import resources

    _check(cfg)
    # Trial processes run in their trial folders: local paths must not depend on this one's.
    cfg = config_from_dict(cfg.to_dict(redact=False))  # a copy in this process: keeps the credentials
    for section, key in (("tune", "output"), ("data", "synthetic"), ("data", "real"), ("data", "real_val"),
                         ("data", "real_test"), ("train", "storage_path")):
        uri = getattr(getattr(cfg, section), key)
        if uri and not storage.is_s3(uri):
            setattr(getattr(cfg, section), key, storage.resolve(uri)[1])
    # The trials log into the sweep's experiment, nested under its run.
    cfg.tracking.mlflow_uri = tracking.absolute_uri(cfg.tracking.mlflow_uri)
    cfg.tracking.experiment = tracking.sweep_experiment(cfg)
    ray_cluster.connect()  # as every command: RAY_ADDRESS, a registered cluster, or a local instance
    ray_cluster.require_shared_storage({f"{section}.{key}": getattr(getattr(cfg, section), key) for section, key in
                                        (("tune", "output"), ("data", "synthetic"), ("data", "real"),
                                         ("data", "real_val"))}, "tune")
    folder = sweep_folder(cfg)
    with tracking.sweep_run(cfg, folder) as parent:
        parent.save_run(folder, cfg.storage)  # a resumed sweep goes on with the same parent run
        book = rungs.start_book(folder, cfg.storage, cfg.tune.reduction_factor,
                                ordered=cfg.train.deterministic and cfg.tune.search != "optuna")
        try:
            concurrency, worker_resources = sweep_resources(cfg)
            console.say(f"tune: each trial {resources.describe(worker_resources, cfg)}")
            grid = make_tuner(cfg, concurrency, worker_resources, parent.run_id).fit()
        finally:  # the autoscaler request sweep_resources may have made: the sweep's nodes are not kept after it
            resources.clear_resource_request()
            ray.kill(book)  # its state is in the sweep folder
        ray_cluster.remove_orphaned_placement_groups()  # a trial that failed last: its process is gone now
        rows = [trial_row(result, cfg) for result in grid]
        judge_trials(cfg, rows)
        best = write_results(cfg, rows)
        tracking.log_sweep_results(parent, folder, rows, best, cfg.storage)
    return rows, best


def cli_tune(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    rows, best = sweep(cfg)
    folder = sweep_folder(cfg)
    for r in sorted(rows, key=rank_key):
        judged = "" if math.isnan(r["spread_ratio"]) else f"spread ratio {r['spread_ratio']:.3f}, "
        print(f"  trial {r['trial']}: k_g={r['k_g']} lr={r['lr']:.3g} λ={r['lambda_reg']:.3g} → {judged}"
              f"objective {r['objective']:.4g} (realism {r['realism']:.4g}, drift {r['drift']:.3g} px) [{r['stop']}]")
    print(f"results: {folder}/results.md")
    if best is None:
        raise SystemExit("no trial produced a scored checkpoint")
    print(f"best config: {folder}/best_config.yaml  (simgan-dist train --config {folder}/best_config.yaml)")
    print(f"best checkpoint: {best['checkpoint']}")
    return 0
