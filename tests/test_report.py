"""A tiny real study (`harness ablate` on the session's Ray head), then `harness report` and
`harness compare` on its MLflow store."""
import json
import subprocess
import sys

import optuna
import pytest

from harness.cli import main
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import TINY

pytestmark = [pytest.mark.sweep, pytest.mark.xdist_group("report_study")]  # one worker builds the study


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_address):
    tmp = tmp_path_factory.mktemp("study")
    spec = {
        "name": "tiny_pooling",
        "description": "two pooling variants at a tiny budget",
        "base": {**TINY, "train": {"epochs": 4, "steps_per_epoch": 2, "batch_size": 20}},
        "axes": {"classifier.pool": ["avg", "max"]},
        # a trial that draws raise_once fails (max_failures 0): the store then holds FAILED runs
        "search": {"loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5},
                   "fault": {"dist": "choice", "values": ["none", "raise_once"]}},
        "budget": {"num_samples": 2},
        # no ASHA: one trial at a time, it would stop the second trial at its first rung, before the
        # fault drawn for it is raised at epoch 3 (the store must hold a FAILED run); and without rung
        # checkpoints the errored trial has none before its fault (the resumption below retries it)
        "asha": {"enabled": False},
        # tiny generators are collapsed: the stopper ends every surviving tuning trial at epoch 3 of 4,
        # so the store also holds KILLED (stopped early) runs, deterministically
        "stop": {"collapse_patience": 1, "collapse_min_epoch": 3},
        "max_failures": 0,
        # one trial at a time: each phase's trials reuse one Ray actor (a trial actor's imports cost
        # more than a tiny trial)
        "resources": {"cpu": 1, "max_concurrent": 1},
        "tpe_startup_trials": 2,
        # the class-level control: the confirmation seeds' classifiers inverted directly, untuned
        "control": {"inverter": "direct", "direct": {"candidates_per_class": 2},
                    "train": {"epochs": 1, "steps_per_epoch": 2}},
        "claim": {"statement": "avg leaks more than max", "metric": "ssim_nn_train_mean",
                  "greater": "pool=avg", "lesser": "pool=max"},
    }
    file = tmp / "tiny.yaml"
    file.write_text(yaml.safe_dump(spec))
    out = tmp / "run"
    cmd = [sys.executable, "-m", "harness.cli", "ablate", str(file), "--seeds", "2", "--out", str(out),
           "--address", ray_address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    # the finished study resumed in its folder (test_a_finished_study_resumes_each_phase_without_running_it_again):
    # the tests below then read the store a resumption left, which must be the study's as it ended. (A copy
    # of the folder would not do: a resumption finds its parent run by the folder it was started in.)
    before = _kids(uri)
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    (tmp / "resumed.json").write_text(json.dumps({"returncode": again.returncode, "stderr": again.stderr[-3000:],
                                                  "before": before, "after": _kids(uri)}))
    return uri, tmp


def _kids(uri: str) -> dict[str, list]:
    """run id -> [phase, status, end time] of every trial run of the study."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny_pooling").experiment_id], max_results=1000)
    return {r.info.run_id: [r.data.tags["harness.phase"], r.info.status, r.info.end_time] for r in runs
            if "mlflow.parentRunId" in r.data.tags}


def test_a_finished_study_resumes_each_phase_without_running_it_again(study):
    """`harness ablate --resume` restores every phase of a study, the confirmation and control phases'
    fixed trials included (Tune refuses a restore with another trainable than the one the phase ran).
    On a study that had ended, no run that ended (finished or stopped) runs again and none is written
    twice; a trial that errored is tried again (Tune's resume_errored): here it has no checkpoint before
    its injected fault and fails again."""
    _, tmp = study
    resumed = json.loads((tmp / "resumed.json").read_text())
    assert resumed["returncode"] == 0, resumed["stderr"]
    before, after = resumed["before"], resumed["after"]
    assert sorted(after) == sorted(before) and len(before) == 3 * 2 * 2
    assert {phase for phase, _, _ in before.values()} == {"tune", "confirm", "control"}
    failed = {run for run, (_, status, _) in before.items() if status == "FAILED"}
    assert failed and all(after[run][1] == "FAILED" for run in failed)
    assert {run: after[run] for run in before if run not in failed} == \
        {run: state for run, state in before.items() if run not in failed}


def test_study_tracks_both_phases(study):
    uri, _ = study
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_pooling")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    phases = {(r.data.tags["harness.variant"], r.data.tags["harness.phase"]) for r in kids}
    assert phases == {(v, p) for v in ("pool=avg", "pool=max") for p in ("tune", "confirm", "control")}
    statuses = {r.info.status for r in kids}
    assert "FAILED" in statuses and "KILLED" in statuses and "RUNNING" not in statuses
    confirm = [r for r in kids if r.data.tags["harness.phase"] == "confirm"]
    # confirmation seeds after the tuning seed 0: no confirmation run repeats a tuning trial
    assert len(confirm) == 4 and {r.data.params["seed"] for r in confirm} == {"1000", "1001"}
    assert {r.data.params["classifier.seed"] for r in confirm} == {"1000", "1001"}
    # the control inverts the same classifiers (the confirmation seeds) with its own settings only
    control = [r for r in kids if r.data.tags["harness.phase"] == "control"]
    assert len(control) == 4 and {r.data.params["classifier.seed"] for r in control} == {"1000", "1001"}
    assert {r.data.params["inverter"] for r in control} == {"direct"}
    assert {r.data.params["train.epochs"] for r in control} == {"1"}
    assert {r.data.params["loss.tv"] for r in control} == {"1.0"}  # the default, not the tuned weight
    for v in ("pool=avg", "pool=max"):
        keys = {r.data.tags["harness.classifier_cache_key"] for r in kids
                if r.data.tags["harness.variant"] == v and r.data.tags["harness.phase"] != "tune"}
        assert len(keys) == 2  # per seed, one classifier shared by its confirmation and control runs


def test_report_of_a_real_study_has_every_part(study):
    """End to end on the tiny real study (its numbers are checked against hand-computed values
    in test_report_store.py): every section, the confirmation seeds, every figure."""
    uri, tmp = study
    out = tmp / "report"
    assert main(["report", "--experiment", "tiny_pooling", "--mlflow-uri", uri, "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    for variant in ("pool=avg", "pool=max"):
        assert f"| {variant} | 2 | " in text.split("## Variants")[1]  # n = the two confirmation runs
        assert f"- {variant}: seeds 1000, 1001" in text
    assert "The confirmation seeds are disjoint from the tuning seeds." in text
    assert "Reference points of each variant" in text and "Against the reference points" in text
    control = text.split("## Class-level control")[1].split("## ")[0]
    assert "pool=avg: direct inverter, seeds 1000, 1001" in control and "| pool=max | 2 | " in control
    assert "The claim on the control: **" in control
    for figure in ("grids.png", "per_train_best_ssim.png", "score_vs_epoch.png", "collapse_rate.png"):
        assert (out / "figures" / figure).stat().st_size > 0, figure
    # every tuning trial was stopped early or failed: the promised importance figure is replaced
    # by the reason, found in the study's Optuna file
    importance = text.split("### Loss-weight importance (Optuna, per variant)")[1]
    assert importance.lstrip().startswith("Not drawn:") and "Optuna state COMPLETE" in importance
    assert "pool=avg: 0 of 2 trials ran the whole budget" in importance


def test_study_outcome_on_parent_and_trial_states_in_optuna(study):
    uri, tmp = study
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_pooling")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    tune = [r for r in kids if r.data.tags["harness.phase"] == "tune"]
    m = parent.data.metrics
    assert m["trials_total"] == len(tune) == 4 and m["confirm_trials_finished"] == 4
    assert m["control_trials_finished"] == 4
    assert m["trials_failed"] == sum(r.info.status == "FAILED" for r in tune)
    assert m["trials_collapsed"] + m["trials_pruned"] == sum(r.info.status == "KILLED" for r in tune)
    for variant in ("pool:avg", "pool:max"):
        assert f"best_score/{variant}" in m and f"confirm_mean_score/{variant}" in m
    assert {"summary.json", "optuna.db"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    storage = f"sqlite:///{tmp / 'run' / 'optuna.db'}"
    for variant in ("pool=avg", "pool=max"):
        trials = optuna.load_study(study_name=f"tiny_pooling/{variant}", storage=storage).trials
        runs_of = {r.info.run_id: r for r in tune if r.data.tags["harness.variant"] == variant}
        assert {t.user_attrs["mlflow_run_id"] for t in trials} == set(runs_of)
        for t in trials:  # stopped at epoch 3 of 4 by the collapse stopper, or failed
            status = runs_of[t.user_attrs["mlflow_run_id"]].info.status
            expected = {"KILLED": optuna.trial.TrialState.PRUNED, "FAILED": optuna.trial.TrialState.FAIL}[status]
            assert t.state == expected


def test_compare_lists_differing_params(study, capsys):
    uri, _ = study
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_pooling")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.phase` = 'confirm'", max_results=2)
    assert main(["compare", *[r.info.run_id for r in runs], "--mlflow-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "| seed |" in printed and "| ssim_nn_train_mean |" in printed


@pytest.mark.parametrize("experiment", ["no_such_study"])
def test_report_on_missing_experiment_exits_2(study, experiment, capsys):
    uri, tmp = study
    assert main(["report", "--experiment", experiment, "--mlflow-uri", uri, "--out", str(tmp / "x")]) == 2
    assert "no experiment named" in capsys.readouterr().err
    assert not (tmp / "x").exists()


def test_report_on_empty_experiment_exits_2(study, capsys):
    uri, _ = study
    MlflowClient(uri).create_experiment("empty_one")
    assert main(["report", "--experiment", "empty_one", "--mlflow-uri", uri]) == 2
    assert "holds no study" in capsys.readouterr().err
