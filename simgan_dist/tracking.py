"""MLflow experiment tracking for train, tune, refine and evaluate.

Where: `tracking.mlflow_uri`, else the MLFLOW_TRACKING_URI environment variable; neither: off, and
every call here is a no-op. Who logs: the process that starts a training run (the Ray Train driver,
`train --local`) creates its MLflow run, or finds it again when the run resumes (its id is in every
checkpoint, RUN_FILE); only rank 0 logs metrics and images to it (`RunLog`). A sweep's run is the parent
of its trials' (`mlflow.parentRunId`); refine and evaluate make a run each, tagged with the run of the
checkpoint they used and with their datasets' URIs and manifest checksums.

Tracking never stops a run. Once the run exists, calls go through a background thread; a failing
server is one warning line, later calls are dropped for RETRY_S, and `close()` says what was not
logged (the run's own files keep everything). HTTP requests give up in seconds (QUICK_HTTP; settings
in the environment win). Params are the redacted config (`Config.to_dict`): no secret is sent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simgan_dist import console
from simgan_dist.config import Config

RUN_FILE = "mlflow_run.json"  # in checkpoints and sweep folders: the MLflow run they log to
RETRY_S = 60.0  # after a failed call, later calls are dropped (not waited for) this long
CLOSE_WAIT_S = 30.0  # how long closing waits for the calls still queued
# MLflow's defaults retry a dead server for minutes (7 retries, 120 s timeout) per call.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# What Ray workers and trials need from the driver's environment to reach the same server.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", *QUICK_HTTP)
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db → sqlite:////abs/relative.db: Ray workers and trials run in other folders."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def tracking_uri(cfg: Config) -> str:
    return absolute_uri(cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))


def worker_env() -> dict[str, str]:
    """The MLFLOW_* settings of this process, for Ray workers (`pipeline.share_env`, `tune.with_parameters`)."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if "MLFLOW_TRACKING_URI" in env:
        env["MLFLOW_TRACKING_URI"] = absolute_uri(env["MLFLOW_TRACKING_URI"])
    return env


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as `section.key` params, secrets redacted as in config.yaml."""
    return {f"{section}.{key}": str(value) for section, values in cfg.to_dict().items()
            for key, value in values.items()}


def _client(uri: str):
    from mlflow import MlflowClient  # first: importing mlflow sets its loggers' levels

    for name, value in QUICK_HTTP.items():
        os.environ.setdefault(name, value)
    if not console.verbose():  # MLflow's INFO lines, its run links and urllib3's retry warnings: --verbose only
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        for name in ("mlflow", "alembic", "urllib3.connectionpool"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return MlflowClient(tracking_uri=uri)


def _reason(error: BaseException) -> str:
    return console.failure_line(error)[:200]


class Tracker:
    """One MLflow run, logged to from a background thread; off (every call a no-op) without a run.

    `owner`: this process created or resumed the run and ends it (FINISHED, or FAILED when the `with`
    block raised); rank 0 of a Ray Train run only logs to the run its driver owns.
    """

    def __init__(self, uri: str = "", run_id: str | None = None, client=None, owner: bool = False,
                 say: Callable[[str], None] = console.say):
        self.uri, self.run_id, self.client, self.owner, self.say = uri, run_id, client, owner, say
        self.dropped: Counter[str] = Counter()
        self.first_error = ""
        self.notices: list[str] = []
        self.failing_since: float | None = None
        self.calls: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="mlflow-tracking", daemon=True)
        if run_id:
            self.thread.start()

    @classmethod
    def attach(cls, uri: str, run_id: str | None, say: Callable[[str], None] = console.say) -> Tracker:
        """Log to a run another process owns (rank 0 of a Ray Train run)."""
        if not (uri and run_id):
            return cls(say=say)
        try:
            return cls(uri, run_id, _client(uri), say=say)
        except Exception as exc:  # e.g. a store MLflow cannot open here: the run goes on untracked
            say(f"tracking: warning: MLflow at {uri} cannot be used here ({_reason(exc)}); going on untracked")
            return cls(say=say)

    @classmethod
    def start(cls, cfg: Config, *, name: str, experiment: str, tags: dict[str, str], params: bool = True,
              resume: str | None = None, parent: str | None = None,
              say: Callable[[str], None] = console.say) -> Tracker:
        """The run `resume` names when it exists there, else a new one (under `parent`, if given)."""
        uri = tracking_uri(cfg)
        if not uri:
            return cls(say=say)
        try:
            client = _client(uri)
            run_id = _resumed(client, resume) or _new_run(client, uri, experiment, name, tags, parent)
            if params:
                _log_params(client, run_id, flat_params(cfg))
        except Exception as exc:
            say(f"tracking: warning: could not start an MLflow run at {uri} ({_reason(exc)}); "
                f"{name} goes on untracked")
            return cls(say=say)
        say(f"tracking: MLflow run {run_id} ({'continued' if run_id == resume else 'new'}) in experiment "
            f"{experiment!r} at {uri}")
        return cls(uri, run_id, client, owner=True, say=say)

    @property
    def on(self) -> bool:
        return self.run_id is not None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.owner:
            self.finish(FINISHED if kind is None else FAILED)
        self.close()

    # --- what the stages log ------------------------------------------------------------------

    def metrics(self, step: int | None, values: dict[str, Any]) -> None:
        """Numbers only; NaN/inf are left out (a checkpoint's placeholder objective), "step" is the step."""
        from mlflow.entities import Metric

        if not self.on:
            return
        stamp = int(time.time() * 1000)
        batch = [Metric(key, float(v), stamp, step or 0) for key, v in values.items()
                 if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if batch:
            self.submit("metric report", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if self.on and values:
            batch = [RunTag(key, str(value)) for key, value in values.items()]
            self.submit("tag update", lambda: self.client.log_batch(self.run_id, tags=batch))

    def file(self, path: str | Path, folder: str | None = None, what: str = "file") -> None:
        if self.on:
            self.submit(what, lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def folder(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.on:
            self.submit("folder", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))

    def text(self, text: str, artifact_file: str) -> None:
        if self.on:
            self.submit("file", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def finish(self, status: str) -> None:
        if self.on:
            self.submit("end status", lambda: self.client.set_terminated(self.run_id, status))

    def save_run(self, folder: str, storage_cfg=None) -> None:
        """RUN_FILE in `folder` (a checkpoint, a sweep folder): whoever continues from it logs to this run."""
        from simgan_dist.data import storage

        if self.on:
            storage.write_bytes_atomic(storage.join(folder, RUN_FILE),
                                       json.dumps({"run_id": self.run_id}).encode(), storage_cfg)

    def close(self) -> None:
        """Send what is queued (waiting CLOSE_WAIT_S at most), then say what could not be logged."""
        if not self.thread.is_alive():
            return
        self.calls.put(None)
        self.thread.join(CLOSE_WAIT_S)
        while not self.calls.empty():  # left when the server hung past CLOSE_WAIT_S
            call = self.calls.get_nowait()
            if call is not None:
                self.dropped[call[0]] += 1
        self._say_notices()
        if self.dropped:
            lost = ", ".join(f"{n} {what}{'s' * (n > 1)}" for what, n in sorted(self.dropped.items()))
            self.say(f"tracking: not logged to MLflow run {self.run_id} at {self.uri}: {lost} "
                     f"(first error: {self.first_error}); the run's own files hold them")

    # --- the background thread ----------------------------------------------------------------

    def submit(self, what: str, call: Callable[[], Any]) -> None:
        """Queue `call` (an MLflow client call) for the background thread; `what` names it in the summary."""
        self._say_notices()
        self.calls.put((what, call))

    def _say_notices(self) -> None:
        """The thread's warning, said from the caller's thread (rank 0's console channel is not thread-safe)."""
        while self.notices:
            self.say(self.notices.pop(0))

    def _work(self) -> None:
        while (item := self.calls.get()) is not None:
            what, call = item
            if self.failing_since is not None and time.monotonic() - self.failing_since < RETRY_S:
                self.dropped[what] += 1
                continue
            try:
                call()
                self.failing_since = None
            except Exception as exc:
                self.dropped[what] += 1
                self.failing_since = time.monotonic()
                if not self.first_error:
                    self.first_error = _reason(exc)
                    self.notices.append(f"tracking: warning: MLflow at {self.uri} failed ({self.first_error}); "
                                        "the run goes on, and what is not logged is listed when it ends")


def _resumed(client, run_id: str | None) -> str | None:
    """`run_id` set RUNNING again, when this server has it (a resumed run); None otherwise."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # another server, or deleted: a new run
            return None
        raise
    client.update_run(run_id, status="RUNNING")
    return run_id


def _new_run(client, uri: str, experiment: str, name: str, tags: dict[str, str], parent: str | None) -> str:
    tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
    return client.create_run(_experiment_id(client, uri, experiment), run_name=name, tags=tags).info.run_id


def _experiment_id(client, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A local store's artifacts go beside its database, not into the caller's working folder.
    location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri() \
        if uri.startswith("sqlite:///") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process (a sweep's concurrent trials)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    """New params; on a resumed run, a value that changed becomes a `config_change.<key>` tag
    (MLflow params cannot change)."""
    from mlflow.entities import Param, RunTag

    logged = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    changed = [RunTag(f"config_change.{k}", f"{logged[k]} -> {v}") for k, v in params.items()
               if k in logged and logged[k] != v]
    client.log_batch(run_id, params=new, tags=changed)


def saved_run_id(folder: str | None, storage_cfg=None) -> str | None:
    """The MLflow run id RUN_FILE in `folder` names; None when there is none."""
    from simgan_dist.data import storage

    if not folder:
        return None
    try:
        return json.loads(storage.read_bytes(storage.join(folder, RUN_FILE), storage_cfg))["run_id"]
    except (storage.MissingFileError, ValueError, KeyError, TypeError):
        return None


# --- the stages' runs -------------------------------------------------------------------------


def training_run(cfg: Config, resume_from: str | None, parent: str | None = None,
                 say: Callable[[str], None] = console.say) -> Tracker:
    """A training run's MLflow run: the one its latest checkpoint `resume_from` names, else a new one."""
    from simgan_dist.data import storage

    return Tracker.start(cfg, name=cfg.train.name, experiment=cfg.tracking.experiment or cfg.train.name,
                         tags={"simgan.stage": "train",
                               "simgan.run_folder": storage.join(cfg.train.storage_path, cfg.train.name)},
                         resume=saved_run_id(resume_from, cfg.storage), parent=parent, say=say)


def sweep_run(cfg: Config, folder: str) -> Tracker:
    """A sweep's parent run; a resumed sweep continues the one its folder names."""
    return Tracker.start(cfg, name=cfg.tune.name, experiment=sweep_experiment(cfg),
                         tags={"simgan.stage": "tune", "simgan.sweep_folder": folder},
                         resume=saved_run_id(folder, cfg.storage))


def sweep_experiment(cfg: Config) -> str:
    return cfg.tracking.experiment or cfg.tune.name


def log_sweep_results(tracker: Tracker, folder: str, rows: list[dict[str, Any]], best: dict[str, Any] | None,
                      storage_cfg=None) -> None:
    """The results table and best config as the parent's artifacts; each trial's stop reason on its run
    (`simgan.stop`), and a trial whose process died before it could end its run marked as it ended."""
    from simgan_dist.data import storage

    if not tracker.on:
        return
    for name in ("results.csv", "results.md", "best_config.yaml"):
        try:
            tracker.text(storage.read_bytes(storage.join(folder, name), storage_cfg).decode(), name)
        except storage.MissingFileError:  # no best config when no trial was scored
            continue
    if best is not None:
        tracker.tags({"simgan.best_trial": best["trial"], "simgan.best_checkpoint": best["checkpoint"]})
        tracker.metrics(None, {"best_objective": best["objective"], "best_spread_ratio": best.get("spread_ratio")})
    stops = {str(row["trial"]): row["stop"] for row in rows}

    def mark_trials() -> None:
        children = tracker.client.search_runs(
            [tracker.client.get_run(tracker.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{tracker.run_id}'", max_results=1000)
        for child in children:
            stop = next((s for trial, s in stops.items() if child.info.run_name.endswith(f"-{trial}")), None)
            if stop is None:
                continue
            tracker.client.set_tag(child.info.run_id, "simgan.stop", stop)
            if child.info.status == "RUNNING":
                tracker.client.set_terminated(child.info.run_id, FAILED if stop.startswith("failed") else FINISHED)

    tracker.submit("trial status", mark_trials)


def dataset_tags(datasets: dict[str, str | None], storage_cfg=None) -> dict[str, str]:
    """`simgan.dataset.<role>` = URI and `….manifest_sha256` for each dataset given."""
    from simgan_dist.data.schema import manifest_sha256

    tags = {}
    for role, uri in datasets.items():
        if uri:
            tags[f"simgan.dataset.{role}"] = uri
            try:
                tags[f"simgan.dataset.{role}.manifest_sha256"] = manifest_sha256(uri, storage_cfg)
            except Exception:  # the stage itself says what is wrong with the dataset
                continue
    return tags


def stage_run(cfg: Config, stage: str, checkpoint: str | None, datasets: dict[str, str | None]) -> Tracker:
    """A refine or evaluate run, tagged with the checkpoint's MLflow run and the input datasets; in the
    checkpoint run's experiment unless tracking.experiment says otherwise."""
    if not tracking_uri(cfg):
        return Tracker()
    source = saved_run_id(checkpoint, cfg.storage)
    experiment = cfg.tracking.experiment or (_experiment_name_of(cfg, source) if source else "") or f"simgan-{stage}"
    tags = {"simgan.stage": stage, **dataset_tags(datasets, cfg.storage)}
    if checkpoint:
        tags["simgan.checkpoint"] = checkpoint
    if source:
        tags["simgan.source_run_id"] = source
    return Tracker.start(cfg, name=stage, experiment=experiment, tags=tags)


def _experiment_name_of(cfg: Config, run_id: str) -> str:
    """The experiment of `run_id` on the configured server; "" when it cannot be read (a new experiment then)."""
    try:
        client = _client(tracking_uri(cfg))
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except Exception:  # Tracker.start reports an unreachable server, once
        return ""


def refined_from(refined: str, storage_cfg=None) -> str | None:
    """The checkpoint a refined dataset was made with (its manifest's refine job); None when unreadable."""
    from simgan_dist.data.schema import read_manifest

    try:
        return read_manifest(refined, storage_cfg).extra.get("refine", {}).get("checkpoint")
    except Exception:  # evaluate itself says what is wrong with the dataset
        return None
