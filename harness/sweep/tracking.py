"""MLflow tracking of sweeps: one parent run per sweep (or study), one nested child run per trial.

All MLflow calls happen in the driver (a Ray Tune callback), never in trial processes: a SQLite
store is then written by one process only, and nothing depends on workers reaching the store.
Child runs are keyed by the Ray trial id, so a resumed sweep reopens a trial's run instead of
creating a second one; runs of trials that a killed driver lost are deleted on resume.

What a child run logs, by an explicit allow rule (Ray's own result keys never reach MLflow):
every epoch the losses (`loss`, `loss_<term>`), `epoch`, `nonfinite`, `evaluated`,
`epoch_seconds`, `train_seconds` and `collapse_streak`; the evaluation metrics only on the epochs where they were
computed (`evaluated` = 1; on a NaN/inf epoch the `score` 0 and `collapsed` 1 the scheduler saw);
the classifier's and evaluator's accuracies, the cache hit and set-up time once.
"""
from __future__ import annotations

import datetime
import logging
import math
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray.tune import Callback

from harness.config import flatten
from harness.records.mlflow_store import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TAG_CLASSIFIER_KEY,  # noqa: F401
                                  TAG_KIND, TAG_NOTE, TAG_OPTUNA_STORAGE, TAG_OPTUNA_STUDY, TAG_OPTUNA_TRIAL,
                                  TAG_OUTCOME, TAG_PHASE, TAG_STOP_REASON, TAG_SWEEP_DIR, TAG_TRIAL_ID,
                                  TAG_VARIANT, child_runs, client_for, default_tracking_uri)
from harness.sweep.files import resolve_trial, settings_of

log = logging.getLogger(__name__)

TAG_NODE_ID = "harness.node_id"  # the Ray node a trial ran on (the latest, if it was retried elsewhere)

# the allow rule for child-run metrics (see the module docstring)
EPOCH_METRICS = ("epoch", "loss", "nonfinite", "evaluated", "epoch_seconds", "train_seconds", "collapse_streak")
ONCE_METRICS = ("classifier_test_acc", "evaluator_heldout_acc", "classifier_cache_hit", "setup_seconds",
                "classifier_train_acc", "classifier_train_loss", "classifier_grad_norm", "classifier_parameters",
                "params_per_train_pixel", "kkt_residual_train", "kkt_residual_heldout")
NONFINITE_METRICS = ("score", "collapsed")


def ensure_experiment(client: MlflowClient, name: str, artifact_dir: Path | None) -> str:
    """The experiment's id, created (with artifacts under `artifact_dir` for a local store) if new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = artifact_dir.resolve().as_uri() if artifact_dir is not None else None
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def runs_table_url(uri: str, experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in MLflow's UI: served by the tracking server itself for an
    http(s) URI, else by `mlflow ui` (default port 5000) over the local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def how_to_view(uri: str, experiment: str, out_dir: Path) -> str:
    """Printed at the end of a sweep or study: where the runs are and how to open both views."""
    exp = client_for(uri).get_experiment_by_name(experiment)
    lines = [f"MLflow: {uri} (experiment {experiment!r})"]
    if not uri.startswith(("http://", "https://")):
        lines.append(f"  view: mlflow ui --backend-store-uri {uri} --port 5000")
    if exp is not None:
        lines.append(f"  runs table: {runs_table_url(uri, exp.experiment_id)}")
    db = (out_dir / "optuna.db").resolve()
    if db.exists():
        lines.append(f"Optuna: sqlite:///{db} (view: optuna-dashboard sqlite:///{db})")
    lines.append(f"Ray Tune: {(out_dir / 'ray').resolve()}")
    return "\n".join(lines)


def trial_metrics(result: dict[str, Any], evaluation_names: tuple[str, ...], first: bool) -> dict[str, float]:
    """The finite metrics of one Tune result that a child run logs at this epoch (allow rule)."""
    keys = [k for k in result if k in EPOCH_METRICS or k.startswith("loss_")]
    if result.get("evaluated"):
        keys += [k for k in result if k in evaluation_names]
    elif result.get("nonfinite"):
        keys += [k for k in NONFINITE_METRICS if k in result]
    if first:
        keys += [k for k in ONCE_METRICS if k in result]
    return _numeric({k: result[k] for k in keys})


def start_parent(client: MlflowClient, experiment_id: str, run_name: str, sweep_dir: Path, kind: str,
                 params: dict[str, Any], resume: bool) -> str:
    """The sweep's parent run: reopened on --resume, else new."""
    sweep_dir = str(sweep_dir.resolve())
    if resume:
        found = client.search_runs([experiment_id], f"tags.`{TAG_SWEEP_DIR}` = '{sweep_dir}' "
                                   f"and tags.`{TAG_KIND}` = '{kind}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={TAG_SWEEP_DIR: sweep_dir, TAG_KIND: kind})
    for key, value in list(flatten(params).items())[:500]:
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def finish_open_runs(client: MlflowClient, experiment_id: str, parent_id: str, status: str, reason: str) -> None:
    """End the parent with `status` and every child still RUNNING (e.g. after an interrupt): a child
    whose end no callback saw did not end normally, so it is never marked FINISHED (KILLED instead),
    and reports leave it out of their averages."""
    child_status = "KILLED" if status == "FINISHED" else status
    for run in child_runs(client, experiment_id, parent_id):
        if run.info.status == "RUNNING":
            why = reason if child_status == status else f"{reason}, but this trial's end was never reported"
            client.set_tag(run.info.run_id, TAG_STOP_REASON, why)
            client.set_tag(run.info.run_id, TAG_NOTE, why[0].upper() + why[1:] + ".")
            client.set_terminated(run.info.run_id, child_status)
    client.set_terminated(parent_id, status)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class MlflowTrialLogger(Callback):
    """Ray Tune callback: a nested child run per trial with flattened params, every epoch's
    metrics (allow rule above), tags (variant, phase, classifier cache key, stop reason, outcome,
    Optuna study and trial) and, from the trial's last checkpoint, the image grid,
    nearest-neighbour pairs, samples and resolved config. With a `recorder`, each trial is also
    written to the variant's persistent Optuna study the moment it ends."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, base_config: dict,
                 max_epochs: int, tags: dict[str, str] | None = None, fixed: dict[int, dict] | None = None,
                 metric: str = "score", objectives: list[str] | None = None, recorder=None,
                 stopper=None, keeper=None):
        from harness.records.metric_names import METRIC_NAMES, REFERENCE_NAMES, SITUATIONAL_NAMES

        self.uri, self.experiment_id, self.parent = tracking_uri, experiment_id, parent_run_id
        self.base_config, self.max_epochs, self.tags = base_config, max_epochs, tags or {}
        # the sweep's collapse stopper (None: no such stopper), asked to tell its stops from ASHA's
        self.stopper = stopper
        # harness.sweep.storage.CheckpointKeeper (None: checkpoints are left alone): told of each trial
        # whose artifacts are logged, removes its checkpoints once Tune's saved state records it as ended
        self.keeper = keeper
        self.archived: set[str] = set()  # trials whose artifacts are in MLflow (their checkpoints may go)
        self.fixed = fixed or {}  # grid index -> settings, for trials of a fixed list (no search)
        self.metric, self.objectives, self.recorder = metric, objectives or [metric], recorder
        self.evaluation_names = (*METRIC_NAMES, *SITUATIONAL_NAMES, *REFERENCE_NAMES)
        self.runs: dict[str, str] = {}
        self.checkpoints: dict[str, Any] = {}
        self.last: dict[str, dict] = {}
        self.ended: set[str] = set()  # trials that completed or errored (not merely interrupted)
        self.outcomes: dict[str, str] = {}  # trial id -> finished / pruned / collapsed / nonfinite / timed_out / failed
        self.optuna_numbers: dict[str, int] = {}
        self.logged_epoch: dict[str, int] = {}  # a trial resumed from an older checkpoint repeats epochs
        self.constants_logged: set[str] = set()
        self.nodes: dict[str, str] = {}  # trial id -> the Ray node it last reported from
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def __getstate__(self):  # Tune pickles callbacks into its experiment state
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def adopt_existing(self, live_trial_ids: set[str]) -> None:
        """On resume: map trial ids to their runs; delete runs of trials the driver lost."""
        for run in child_runs(self.client, self.experiment_id, self.parent):
            trial_id = run.data.tags.get(TAG_TRIAL_ID)
            if trial_id in live_trial_ids and trial_id not in self.runs:
                self.runs[trial_id] = run.info.run_id
                self.logged_epoch[trial_id] = int(run.data.metrics.get("epoch", 0))
                if "classifier_test_acc" in run.data.metrics:
                    self.constants_logged.add(trial_id)
                reason = run.data.tags.get(TAG_STOP_REASON, "")
                if run.info.status != "RUNNING" and not reason.startswith("interrupted"):
                    self.ended.add(trial_id)
                    if TAG_OUTCOME in run.data.tags:
                        self.outcomes[trial_id] = run.data.tags[TAG_OUTCOME]
                    if self.outcomes.get(trial_id) != "failed":  # logged its artifacts as it ended
                        self.archived.add(trial_id)
                    if TAG_OPTUNA_TRIAL in run.data.tags:
                        self.optuna_numbers[trial_id] = int(run.data.tags[TAG_OPTUNA_TRIAL])
            elif trial_id not in live_trial_ids and run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, TAG_STOP_REASON, "lost: the driver died before "
                                    "this trial was saved; Tune resampled it")
                self.client.set_terminated(run.info.run_id, "KILLED")
                self.client.delete_run(run.info.run_id)

    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            run_id = self.runs[trial.trial_id]
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        resolved = resolve_trial(self.base_config, self.settings_of(trial.config)).model_dump()
        tags = {"mlflow.parentRunId": self.parent, TAG_TRIAL_ID: trial.trial_id, **self.tags}
        run = self.client.create_run(self.experiment_id, run_name=f"{self.tags.get(TAG_VARIANT, 'trial')}-{trial.trial_id}",
                                     tags=tags)
        run_id = run.info.run_id
        params = flatten(resolved)
        from mlflow.entities import Param
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[i:i + 100])
        self.runs[trial.trial_id] = run_id
        return run_id

    def settings_of(self, config: dict) -> dict:
        """The dotted settings a trial runs with (searched values, or its fixed list entry)."""
        return settings_of(config, self.fixed)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        node = result.get("node_id")
        if node and self.nodes.get(trial.trial_id) != node:
            self.nodes[trial.trial_id] = node
            self.client.set_tag(run_id, TAG_NODE_ID, str(node))
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.last[trial.trial_id] = result
        if step <= self.logged_epoch.get(trial.trial_id, 0):
            return  # replayed from a checkpoint: the same epoch (same RNG state) is logged already
        self.logged_epoch[trial.trial_id] = step
        first = trial.trial_id not in self.constants_logged
        self.constants_logged.add(trial.trial_id)
        metrics = trial_metrics(result, self.evaluation_names, first)
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i:i + 500])
        if "classifier_cache_key" in result and step == 1:
            self.client.set_tag(run_id, TAG_CLASSIFIER_KEY, str(result["classifier_cache_key"]))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.checkpoints[trial.trial_id] = checkpoint

    def _log_final_artifacts(self, trial, run_id: str) -> bool:
        """Log the artifacts of the trial's last checkpoint (with `keep_weights: all` also the
        inverter's weights); False where that failed (its checkpoint must then stay)."""
        checkpoint = self.checkpoints.pop(trial.trial_id, None) or getattr(trial, "checkpoint", None)
        if checkpoint is None:
            return True  # nothing to log, nothing on disk to keep for it
        names = ["grid.png", "nearest.png", "reconstructions.png", "samples.pt", "config.yaml", "metrics.json",
                 "per_train_best_ssim.json"]
        if self.keeper is not None and self.keeper.keep_weights == "all":
            names.append("inverter.pt")
        try:
            with checkpoint.as_directory() as d:
                for name in names:
                    if (Path(d) / name).exists():
                        self.client.log_artifact(run_id, str(Path(d) / name))
        except Exception as exc:  # an artifact problem must not fail the sweep
            log.warning("could not log artifacts of %s: %s", trial.trial_id, exc)
            return False
        return True

    def log_weights(self, run_id: str, path: Path) -> bool:
        """Log a best trial's weights (inverter.pt) to its run; False where that failed."""
        try:
            self.client.log_artifact(run_id, str(path))
        except Exception as exc:
            log.warning("could not log the weights %s to run %s: %s", path, run_id, exc)
            return False
        return True

    def has_weights(self, run_id: str) -> bool:
        """Whether the run holds the inverter's weights already (a resumed sweep that had ended)."""
        try:
            return any(a.path == "inverter.pt" for a in self.client.list_artifacts(run_id))
        except Exception:
            return False

    def on_step_end(self, iteration, trials, **info):
        # ended trials' checkpoints are removed once the variant's run has ended (settle_checkpoints), not
        # while Tune runs: with the cleanup here a smoke sweep hung after an ASHA stop (no trial started
        # again for minutes, seen twice in full suite runs); Tune's trial order is still recorded
        if self.keeper is not None:
            self.keeper.set_order(getattr(t, "trial_id", None) for t in trials)

    def _end(self, trial, run_id: str, outcome: str, status: str, reason: str, result: dict) -> None:
        """Record the trial in the Optuna study (if any), then tag and end its MLflow run."""
        tags = {TAG_STOP_REASON: reason, TAG_OUTCOME: outcome}
        note = reason[0].upper() + reason[1:] + "."
        if self.recorder is not None:
            try:
                number = self._record_optuna(trial, run_id, outcome, reason, result)
            except Exception as exc:  # the study is a view of the sweep: never fail the sweep for it
                log.warning("could not write trial %s to the Optuna study: %s", trial.trial_id, exc)
            else:
                self.optuna_numbers[trial.trial_id] = number
                tags |= {TAG_OPTUNA_STUDY: self.recorder.study_name, TAG_OPTUNA_TRIAL: str(number)}
                state = "COMPLETE" if outcome == "finished" else "FAIL" if outcome == "failed" else "PRUNED"
                note += f" Optuna: trial {number} of study {self.recorder.study_name} ({state})."
        tags[TAG_NOTE] = note
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status)
        self.outcomes[trial.trial_id] = outcome
        self.ended.add(trial.trial_id)

    def _record_optuna(self, trial, run_id: str, outcome: str, reason: str, result: dict) -> int:
        history = self.client.get_metric_history(run_id, self.metric)
        intermediate = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        started = datetime.datetime.fromtimestamp(self.client.get_run(run_id).info.start_time / 1000)
        values = [result.get(m) for m in self.objectives] if outcome == "finished" else None
        return self.recorder.record(
            trial.trial_id, trial.config, outcome, values, intermediate, started=started,
            user_attrs={"mlflow_run_id": run_id, "mlflow_experiment_id": self.experiment_id,
                        "variant": self.tags.get(TAG_VARIANT, ""), "phase": self.tags.get(TAG_PHASE, ""),
                        "stop_reason": reason, "epochs": int(result.get("epoch", 0))})

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        # a trial that finished just before a driver died gets no result in this session
        result = self.last.get(trial.trial_id) or getattr(trial, "last_result", None) or {}
        epoch = max(int(result.get("epoch", 0)), self.logged_epoch.get(trial.trial_id, 0))
        if result.get("nonfinite"):
            outcome, status, reason = "nonfinite", "KILLED", f"stopped: the loss became NaN/inf at epoch {epoch}"
        elif epoch >= self.max_epochs:
            outcome, status, reason = "finished", "FINISHED", f"completed the epoch budget ({epoch} epochs)"
        elif self.stopped_by_time(trial, result):
            outcome, status, reason = ("timed_out", "KILLED",
                                       f"stopped: time budget train.max_seconds reached at epoch {epoch}")
        elif self.stopped_collapsed(result):
            outcome, status, reason = ("collapsed", "KILLED", f"stopped: collapsed at "
                                       f"{int(result['collapse_streak'])} evaluations in a row at epoch {epoch}")
        else:
            outcome, status, reason = "pruned", "KILLED", f"pruned by ASHA at epoch {epoch}"
        archived = self._log_final_artifacts(trial, run_id)
        self._end(trial, run_id, outcome, status, reason, {**result, "epoch": epoch})
        if archived:
            self.archived.add(trial.trial_id)
            if self.keeper is not None:
                self.keeper.trial_ended(trial.trial_id, {**result, "epoch": epoch})

    def stopped_collapsed(self, result: dict) -> bool:
        """Whether the collapse stopper ended the trial (else an early stop was ASHA's)."""
        return self.stopper is not None and self.stopper.collapsed(result)

    def stopped_by_time(self, trial, result: dict) -> bool:
        """Whether the trial's own time budget (`train.max_seconds`) ended it: the trainable's
        `out_of_time` flag, else its training seconds against the trial's resolved limit."""
        if "out_of_time" in result:
            return bool(result["out_of_time"])
        try:
            limit = resolve_trial(self.base_config, self.settings_of(trial.config)).train.max_seconds
        except Exception:  # not a trial config this logger can build: no time budget known
            return False
        return bool(limit) and float(result.get("train_seconds", 0.0)) >= limit

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self._log_final_artifacts(trial, run_id)
        result = self.last.get(trial.trial_id) or getattr(trial, "last_result", None) or {}
        self._end(trial, run_id, "failed", "FAILED", "error: see the Ray trial's error.txt", result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.client.set_tag(run_id, "harness.retried", "true")
