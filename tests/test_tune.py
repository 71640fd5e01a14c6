"""A real Ray Tune sweep on CPU: successive halving at rungs, results, the winner's config, resume, history actors."""

import json
import math

import pyarrow.csv
import pytest
import yaml
from leak_check import FAKE, every_output, leaked

from simgan_dist.config import load_config
from simgan_dist.data.simulate import simulate_dataset
from simgan_dist.train.driver import history_run_id
from simgan_dist.train.local import train_local
from simgan_dist.tune import TuneError, default_concurrency, sweep, sweep_resources
from simgan_dist.tune_space import trial_config, trial_count


def _trial_reports(folder) -> dict[str, int]:
    return {p.parent.name: len(p.read_text().splitlines()) for p in folder.glob("run_trial_*/result.json")}


@pytest.mark.slow
def test_sweep_stops_a_bad_trial_writes_the_winner_and_resumes(ray_local, mlflow_server, tmp_path, monkeypatch,
                                                              capsys):
    """The two trials run at once, yet the bad one (the second) is always stopped at the first rung, as in a
    sweep of one trial at a time (train.deterministic; ASHA itself let it go on whenever it got there first).
    Also: with fake credentials in the config, no file the sweep writes (best_config.yaml,
    results, Tune's trial files, the trials' training runs) nor the Ray session's logs nor the
    console nor the MLflow store holds them; the trials get their config's secrets through the object
    store. In MLflow the sweep is one parent run (continued when resumed) with the trials nested."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # relative paths, as `make demo` gives: trials run in their own folders
    simulate_dataset("data", synthetic=160, real=160, real_test=0, seed=2, rows_per_shard=80)
    cfg = load_config("tiny", overrides=[
        *[f"storage.{key}={secret}" for key, secret in FAKE.items()],
        "data.synthetic=data/synthetic", "data.real=data/real",
        f"data.real_test={tmp_path / 'does-not-exist'}",  # the objective must never read it
        "data.real_val_fraction=0.2", "train.eval_every=2", "train.eval_samples=32", "train.keep_best=2",
        "train.pretrain_refiner_steps=4", "train.pretrain_disc_steps=2", "train.iterations=4",
        "train.checkpoint_every=10", "train.storage_path=runs", "tune.name=t", "tune.output=sweeps",
        "tune.search=grid", "tune.num_samples=1",
        "tune.k_g=[1]",
        "tune.lr=[1.0e-4, 5.0]",  # lr 5 wrecks the refiner in its first steps: the rung at step 2 must stop it
        "tune.lambda_reg=[1.0e-4]", "tune.grace_steps=2", "tune.max_concurrent_trials=2",
        f"tracking.mlflow_uri={mlflow_server.uri}", f"tracking.experiment=sweep-{tmp_path.name}"])
    held_before = _placement_groups_holding_resources()
    rows, best = sweep(cfg)
    by_lr = {r["lr"]: r for r in rows}
    assert set(by_lr) == {1e-4, 5.0}, rows
    assert by_lr[5.0]["stop"] == "stopped at a rung" and by_lr[5.0]["last_step"] == 2
    assert by_lr[1e-4]["stop"] == "completed"
    assert best["lr"] == 1e-4 and best["objective"] < by_lr[5.0]["objective"]
    # the completed trial is judged once (a gaze estimator on its refined eyes); the stopped one is not
    assert best["spread_ratio"] > 0 and best["spread"] > 0 and math.isnan(by_lr[5.0]["spread_ratio"])

    folder = tmp_path / "sweeps" / "t"
    assert "stopped at a rung" in (folder / "results.md").read_text()
    assert "Completed eye trials ranked by spread_ratio" in (folder / "results.md").read_text()
    book = json.loads((folder / "_rungs.json").read_text())
    assert book["ordered"] and book["verdicts"] == {"0@2": True, "1@2": False, "0@4": True, "0@8": True}, book
    table = pyarrow.csv.read_csv(folder / "results.csv")  # a reader's defaults: the stopped trial's judge is null
    assert table.num_rows == 2 and pyarrow.types.is_floating(table.schema.field("spread_ratio").type)
    assert table.column("spread_ratio").null_count == 1 and " nan " not in (folder / "results.md").read_text()
    checkpoint = (folder / "best_checkpoint.txt").read_text().strip()
    assert json.loads(open(f"{checkpoint}/scores.json").read())["objective"] == pytest.approx(best["objective"])
    import ray

    assert not [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("simgan-history/")], "a trial's history actors outlived it"
    # no trial's worker group placement group holds CPUs until the session ends (Ray Train's own cleaner
    # needs the dashboard, absent here)
    assert _placement_groups_holding_resources() <= held_before

    assert set(json.loads(next(folder.glob("run_trial_*/params.json")).read_text())) == {"k_g", "lr", "lambda_reg"}
    session_logs = ray._private.worker._global_node.get_session_dir_path()
    assert not leaked(every_output(None, None, tmp_path, session_logs, mlflow_server.db.parent))
    printed = capsys.readouterr()
    assert not any(secret in printed.out + printed.err for secret in FAKE.values())

    # the winner's config trains as written (here with the local trainer, shortened)
    winner = load_config("eye", folder / "best_config.yaml", ["train.iterations=2", "train.eval_every=0"])
    assert winner.train.lr == 1e-4 and winner.train.k_g == 1
    train_local(winner, tmp_path / "winner", progress=False)

    # the same sweep again: restored, nothing rerun
    before = _trial_reports(folder)
    rows_again, best_again = sweep(cfg)
    assert _trial_reports(folder) == before
    assert best_again["objective"] == best["objective"]
    assert best_again["spread_ratio"] == pytest.approx(best["spread_ratio"], rel=1e-6)  # judged with the sweep's seed

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(f"sweep-{tmp_path.name}").experiment_id])
    [parent] = [r for r in runs if r.data.tags["simgan.stage"] == "tune"]  # the resumed sweep continued it
    trials = {float(r.data.params["train.lr"]): r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(trials) == {1e-4, 5.0}  # both nested (the winner's retraining above is a run of its own)
    assert trials[5.0].data.tags["simgan.stop"] == "stopped at a rung" and trials[5.0].info.status == "FINISHED"
    assert trials[1e-4].info.status == "FINISHED" and client.get_metric_history(trials[1e-4].info.run_id, "objective")
    assert parent.data.tags["simgan.best_checkpoint"] == checkpoint
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.md", "best_config.yaml"}


def _placement_groups_holding_resources() -> set[str]:
    import ray

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def test_trials_get_their_own_history_buffer():
    base = load_config("tiny").to_dict()
    params = {"k_g": 2, "lr": 1e-3, "lambda_reg": 1e-4}
    runs = {history_run_id(trial_config(base, params, trial)) for trial in ("abc_00000", "abc_00001")}
    assert len(runs) == 2
    assert yaml.safe_load(load_config("tiny").to_yaml())["tune"]["k_g"] == [1, 2]


def test_default_concurrency_leaves_each_trial_a_cpu_for_its_data():
    cfg = load_config("tiny", overrides=["train.num_workers=1"])
    assert default_concurrency(cfg, {"CPU": 2}) == 1
    assert default_concurrency(cfg, {"CPU": 8}) == 3  # each trial: 1 worker, 1 for Ray Data, 2 x 0.25 for history
    assert default_concurrency(load_config("tiny", overrides=["train.num_workers=1", "train.buffer_shards=4"]),
                               {"CPU": 9}) == 3
    gpu = load_config("tiny", overrides=["train.num_workers=1", "train.use_gpu=true"])
    assert default_concurrency(gpu, {"CPU": 64, "GPU": 8}) == 8
    # each trial: its 0.01, 1 for Ray Data, 0.5 for history, 0.25 left for the worker (0.5 beside Ray Data)
    assert default_concurrency(gpu, {"CPU": 4, "GPU": 8}) == 2
    assert default_concurrency(gpu, {"CPU": 3.5, "GPU": 8}) == 1


def test_a_sweep_too_wide_for_the_cluster_fails_before_its_first_trial(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 5.0})  # 2 x (1 worker + 1 Ray Data + 0.5 history)
    assert sweep_resources(load_config("tiny", overrides=["train.num_workers=1"])) == (2, {"CPU": 0.99})
    too_wide = load_config("tiny", overrides=["train.num_workers=2", "tune.max_concurrent_trials=3"])
    with pytest.raises(TuneError, match=r"3 trials at once \(tune.max_concurrent_trials=3\) do not fit: "
                                        r".*lower tune.max_concurrent_trials"):
        sweep_resources(too_wide)


def test_a_failed_trial_is_summed_up_by_its_exception_line():
    from simgan_dist.console import failure_line

    error = RuntimeError("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, repr=run_trial)\n  File \"x.py\", line 3\n"
                         "TypeError: run_trial() missing 1 required positional argument: 'base'\n")
    assert failure_line(error) == "TypeError: run_trial() missing 1 required positional argument: 'base'"
    assert failure_line(RuntimeError("")) == "RuntimeError"


def test_trial_count_multiplies_grid_lists():
    grid = load_config("tiny", overrides=["tune.search=grid", "tune.num_samples=2", "tune.k_g=[1, 2]",
                                          "tune.lr=[1.0e-3]", "tune.lambda_reg={min: 1.0e-4, max: 1.0e-2}"])
    assert trial_count(grid) == 4
    grid.tune.search = "random"
    assert trial_count(grid) == 2


def test_judged_trials_rank_first_by_their_spread_ratio_then_the_rest_by_objective():
    from simgan_dist.tune_judge import rank_key

    nan = math.nan
    rows = [{"trial": "a", "objective": 0.5, "spread_ratio": 0.9},
            {"trial": "b", "objective": 0.7, "spread_ratio": 0.8},
            {"trial": "c", "objective": 0.1, "spread_ratio": nan},
            {"trial": "d", "objective": nan, "spread_ratio": nan},
            {"trial": "e", "objective": 0.3}]
    assert [r["trial"] for r in sorted(rows, key=rank_key)] == ["b", "a", "c", "e", "d"]


@pytest.mark.slow
def test_a_trial_that_cannot_be_judged_keeps_its_row_and_says_why(ray_local, tmp_path, capsys):
    """The judge runs after every trial has finished: one failing (here its checkpoint is gone) must not
    lose the sweep's results; that trial ranks by objective, after the judged ones."""
    from simgan_dist.tune_judge import judge_trials

    simulate_dataset(str(tmp_path / "data"), synthetic=32, real=40, real_test=0, seed=3, rows_per_shard=40)
    cfg = load_config("tiny", overrides=[f"data.synthetic={tmp_path / 'data' / 'synthetic'}",
                                         f"data.real={tmp_path / 'data' / 'real'}", "data.real_val_fraction=0.5"])
    rows = [{"trial": "gone", "stop": "completed", "checkpoint": str(tmp_path / "no-such-checkpoint"),
             "objective": 0.4},
            {"trial": "stopped", "stop": "stopped at a rung", "checkpoint": "", "objective": 0.3}]
    judge_trials(cfg, rows)
    assert all(math.isnan(r["spread_ratio"]) and math.isnan(r["spread"]) for r in rows)
    out = capsys.readouterr().out
    assert "trial gone could not be judged" in out and "no-such-checkpoint" in out, out
