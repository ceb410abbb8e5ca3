"""The tracking layer without Ray: what a child run logs (the allow rule) and how each trial reaches
the persistent Optuna study the moment it ends (driven through the Tune callback with stand-in
trials, a real SQLite MLflow store and a real SQLite Optuna study)."""
import pickle
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.records.optuna_study import StudyRecorder, storage_url, trial_params
from harness.sweep.files import Distribution
from harness.sweep.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTrialLogger, client_for, ensure_experiment,
                              runs_table_url, trial_metrics)

SEARCH = {"loss.cos": Distribution(dist="loguniform", low=0.01, high=1.0, allow_off=True),
          "loss.tv": Distribution(dist="uniform", low=0.0, high=0.5)}
EVALUATION = ("score", "collapsed", "ssim_nn_train_mean")

# what Ray Tune adds to every result a trainable reports (Ray 2.60)
RAY_KEYS = {"should_checkpoint": True, "done": False, "training_iteration": 3, "trial_id": "abc_00001",
            "date": "2026-01-01_00-00-00", "timestamp": 1767225600, "time_this_iter_s": 0.5,
            "time_total_s": 2.0, "pid": 1234, "hostname": "node", "node_ip": "127.0.0.1",
            "time_since_restore": 2.0, "iterations_since_restore": 3, "config/loss.tv": 0.2,
            "experiment_tag": "1_loss.tv=0.2", "checkpoint_dir_name": "checkpoint_000002"}


def row(epoch: int, evaluated: bool, score: float, nonfinite: bool = False) -> dict:
    return {"epoch": epoch, "loss": 1.0 / epoch, "loss_cos": 0.1, "nonfinite": float(nonfinite),
            "evaluated": float(evaluated), "epoch_seconds": 0.1, "collapse_streak": 0, "score": score,
            "collapsed": 0.0, "ssim_nn_train_mean": score / 2, "classifier_test_acc": 0.9,
            "evaluator_heldout_acc": 0.95, "classifier_cache_hit": 1.0, "setup_seconds": 3.0,
            "classifier_cache_key": "k", **RAY_KEYS}


def test_allow_rule_logs_no_ray_key_and_evaluations_only_where_computed():
    first = trial_metrics(row(1, True, 0.3), EVALUATION, first=True)
    assert not set(first) & set(RAY_KEYS)
    assert {"score", "ssim_nn_train_mean", "classifier_test_acc", "evaluator_heldout_acc", "loss", "loss_cos",
            "evaluated", "epoch"} <= set(first)
    between = trial_metrics(row(3, False, 0.3), EVALUATION, first=False)
    assert set(between) == {"epoch", "loss", "loss_cos", "nonfinite", "evaluated", "epoch_seconds", "collapse_streak"}
    nan_epoch = trial_metrics(row(4, False, 0.0, nonfinite=True) | {"loss": float("nan")}, EVALUATION, first=False)
    assert nan_epoch["score"] == 0 and "loss" not in nan_epoch and "ssim_nn_train_mean" not in nan_epoch


def test_trial_params_leave_out_a_term_that_is_off():
    params, dists = trial_params(SEARCH, {"loss.cos.on": False, "loss.cos": 0.0, "loss.tv": 0.2})
    assert params == {"loss.cos.on": False, "loss.tv": 0.2} and set(dists) == set(params)
    params, _ = trial_params(SEARCH, {"loss.cos.on": True, "loss.cos": 0.05, "loss.tv": 0.2})
    assert params == {"loss.cos.on": True, "loss.cos": 0.05, "loss.tv": 0.2}


def test_experiment_opens_on_the_runs_table(tmp_path, fresh_store):
    client = client_for(fresh_store(tmp_path / 'm.db'))
    exp_id = ensure_experiment(client, "e", tmp_path / "art")
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert runs_table_url("http://h:5000/", exp_id).endswith(f"/#/experiments/{exp_id}/runs?workflowType=machine_learning")


@pytest.mark.parametrize("status, child", [("FINISHED", "KILLED"), ("KILLED", "KILLED"), ("FAILED", "FAILED")])
def test_leftover_running_children_never_end_finished(tmp_path, fresh_store, status, child):
    from harness.sweep.tracking import finish_open_runs
    client = client_for(fresh_store(tmp_path / 'm.db'))
    exp_id = ensure_experiment(client, "e", tmp_path / "art")
    parent = client.create_run(exp_id, run_name="parent").info.run_id
    ended = client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(ended, "FINISHED")
    open_ = client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
    finish_open_runs(client, exp_id, parent, status, "sweep finished")
    assert client.get_run(parent).info.status == status
    assert client.get_run(ended).info.status == "FINISHED"  # a child that ended is left as it ended
    assert client.get_run(open_).info.status == child


@pytest.fixture
def logger(tmp_path, fresh_store):
    uri = fresh_store(tmp_path / 'mlflow.db')
    client = client_for(uri)
    exp_id = ensure_experiment(client, "unit", tmp_path / "mlartifacts")
    parent = client.create_run(exp_id, run_name="parent").info.run_id
    recorder = StudyRecorder(storage_url(tmp_path), "unit/all", ["maximize"], ["score"], SEARCH)
    log = MlflowTrialLogger(uri, exp_id, parent, {"train": {"epochs": 6}}, max_epochs=6,
                            tags={"harness.variant": "all", "harness.phase": "tune"}, recorder=recorder)
    return log, client, storage_url(tmp_path)


def run_trial(log, trial_id: str, epochs: int, end: str = "complete", last_score: float = 0.5):
    trial = SimpleNamespace(trial_id=trial_id, config={"loss.cos.on": True, "loss.cos": 0.05, "loss.tv": 0.1},
                            checkpoint=None, last_result=None)
    log.on_trial_start(0, [], trial)
    for epoch in range(1, epochs + 1):
        result = row(epoch, evaluated=epoch in (1, 2, 4, 6), score=last_score * epoch / epochs)
        log.on_trial_result(0, [], trial, result)
        trial.last_result = result
    (log.on_trial_complete if end == "complete" else log.on_trial_error)(0, [], trial)
    return trial


def test_each_trial_is_in_the_study_as_it_ends_with_its_state_and_links(logger):
    log, client, storage = logger
    run_trial(log, "t1", epochs=2)  # stopped at epoch 2 of 6: ASHA
    study = optuna.load_study(study_name="unit/all", storage=storage)  # a separate reader, at once
    [t] = study.trials
    assert t.state == TrialState.PRUNED and t.intermediate_values == {1: 0.5 / 2, 2: 0.5}
    run = client.get_run(t.user_attrs["mlflow_run_id"])
    assert run.data.tags["harness.optuna_study"] == "unit/all" and run.data.tags["harness.optuna_trial"] == "0"
    assert run.data.tags["harness.trial_id"] == t.user_attrs["ray_trial_id"] == "t1"
    assert run.info.status == "KILLED" and "Pruned by ASHA at epoch 2" in run.data.tags["mlflow.note.content"]
    assert "PRUNED" in run.data.tags["mlflow.note.content"]
    # evaluation metrics only on evaluated epochs; losses every epoch; no Ray key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert not set(run.data.metrics) & set(RAY_KEYS)

    run_trial(log, "t2", epochs=6, last_score=0.7)
    run_trial(log, "t3", epochs=3, end="error")
    study = optuna.load_study(study_name="unit/all", storage=storage)
    states = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    full = states["t2"]
    assert full.state == TrialState.COMPLETE and full.value == pytest.approx(0.7)
    assert sorted(full.intermediate_values) == [1, 2, 4, 6]  # the epochs that were evaluated
    assert full.params == {"loss.cos.on": True, "loss.cos": 0.05, "loss.tv": 0.1}
    assert states["t3"].state == TrialState.FAIL
    assert client.get_run(states["t3"].user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert log.outcomes == {"t1": "pruned", "t2": "finished", "t3": "failed"}


def test_resumed_trials_are_not_written_twice(logger):
    log, client, storage = logger
    trial = run_trial(log, "t1", epochs=6)
    # a resumed driver (fresh, unpickled callback) sees the same trial end again
    again = pickle.loads(pickle.dumps(log))
    again.runs = {"t1": log.runs["t1"]}
    again.on_trial_complete(0, [], trial)
    # an errored trial resumed to its end keeps its failed attempt and adds the finished one
    failed = run_trial(again, "t2", epochs=3, end="error")
    run_trial(again, "t2", epochs=6)
    study = optuna.load_study(study_name="unit/all", storage=storage)
    assert [(t.user_attrs["ray_trial_id"], t.state) for t in study.trials] == [
        ("t1", TrialState.COMPLETE), ("t2", TrialState.FAIL), ("t2", TrialState.COMPLETE)]
    assert study.trials[2].user_attrs["after_failed_attempt"] == 1
    assert failed.trial_id == "t2"
