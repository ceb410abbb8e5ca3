"""The sweep layer on a real Ray head (`ray start --head` on loopback, one per test session) and
a real MLflow store: SQLite, and a real `mlflow server` over HTTP."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.cli import main
from tests.conftest import REPO, TINY, free_port

pytestmark = pytest.mark.sweep


def write_sweep(path: Path, **changes) -> Path:
    spec = {
        "name": changes.pop("name", "t"),
        "base": {**TINY, "train": {"epochs": 3, "steps_per_epoch": 2, "batch_size": 20}},
        "search": {"loss.cos": {"dist": "loguniform", "low": 0.01, "high": 1.0, "allow_off": True},
                   "loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5}},
        "budget": {"num_samples": 2},
        "asha": {"enabled": False},
        "resources": {"cpu": 1},
        "checkpoint_every": 1,
        "tpe_startup_trials": 2,
        "stop": {"collapse_patience": 100},  # tiny trials are collapsed; only NaN should stop them here
    }
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) and key != "search" else value
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_cmd(file: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "sweep", str(file), "--out", str(out), "--address", address, *extra]


def children(uri: str, experiment: str) -> tuple[list, object]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return kids, parents


# keys Ray Tune adds to every result: none may reach MLflow as a metric
RAY_INTERNAL = {"should_checkpoint", "done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s",
                "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
                "timesteps_since_restore", "timesteps_total", "episodes_total", "experiment_tag"}


def test_smoke_sweep_prunes_and_tracks_every_trial(tmp_path, ray_address):
    out = tmp_path / "smoke"
    # the shipped file (6 trials) with fewer steps and a smaller classifier and evaluator: what is
    # checked is the sweep stack, not the images. One trial at a time: asynchronous ASHA's decisions
    # depend on the order in which trials reach a rung, and only a fixed order makes them known
    # from the scores.
    # No collapse stopper: Ray asks it before ASHA, and a trial it stops never reaches ASHA's rung
    proc = subprocess.run(sweep_cmd(REPO / "search_spaces" / "smoke.yaml", out, ray_address,
                                    "--set", "base.train.steps_per_epoch=4",
                                    "--set", "base.classifier.epochs=2", "--set", "base.evaluator.epochs=1",
                                    "--set", "resources.max_concurrent=1", "--set", "stop.collapse_patience=1000000"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| variant | score |" in proc.stdout
    uri = f"sqlite:///{out / 'mlflow.db'}"
    kids, parents = children(uri, "smoke")
    assert len(parents) == 1 and len(kids) == 6
    parent = parents[0]
    assert all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id for k in kids)
    assert {r.info.status for r in kids + parents} <= {"FINISHED", "KILLED"}
    pruned = [k for k in kids if k.info.status == "KILLED"]
    reasons = [k.data.tags["harness.stop_reason"] for k in pruned]
    assert all(r.startswith("pruned by ASHA at epoch") for r in reasons), reasons
    # ASHA's rule worked out from the scores, trial by trial in the order they ran (grace 2, factor 2:
    # rungs at epochs 2 and 4): a trial stops at the first rung where its score is strictly below the
    # median of the scores recorded there before it; the first trial is never stopped. Which trials
    # stop is known only once the scores are: a CI machine's scores once rose trial after trial and
    # none stopped (scores that keep their rank from rung to rung do that one time in 8 with 4 trials,
    # one in 36 with 6), so
    # the test holds ASHA to its rule on whatever order came, stopped trials or none
    client = MlflowClient(tracking_uri=uri)
    recorded, expected = {2: [], 4: []}, {}
    for k in sorted(kids, key=lambda r: r.info.start_time):
        scores = {m.step: m.value for m in client.get_metric_history(k.info.run_id, "score")}
        expected[k.info.run_id] = None
        for rung in (2, 4):
            below = bool(recorded[rung]) and scores[rung] < float(np.median(recorded[rung]))
            recorded[rung].append(scores[rung])
            if below:
                expected[k.info.run_id] = f"pruned by ASHA at epoch {rung}"
                break
    assert {k.info.run_id: (k.data.tags["harness.stop_reason"] if k.info.status == "KILLED" else None)
            for k in kids} == expected
    # the reason is also the run's description, which MLflow's runs table shows
    assert all(k.data.tags["mlflow.note.content"].lower().startswith(k.data.tags["harness.stop_reason"].lower())
               for k in pruned)
    exp = client.get_experiment_by_name("smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in proc.stdout
    epochs = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())["base"]["train"]["epochs"]
    for k in kids:
        assert "loss.cos" in k.data.params and k.data.params["classifier.pool"] == "avg"
        assert k.data.params["threads"] == "1"  # what the trial ran with (resources.cpu), as in its config.yaml
        assert k.data.tags["harness.classifier_cache_key"]
        assert not set(k.data.metrics) & RAY_INTERNAL and not any(m.startswith("config") for m in k.data.metrics)
        assert {"evaluator_heldout_acc", "classifier_test_acc"} <= set(k.data.metrics)
        # losses every epoch, evaluation metrics only on the epochs that evaluated
        losses = [m.step for m in client.get_metric_history(k.info.run_id, "loss")]
        assert losses == list(range(1, len(losses) + 1))
        evaluated = sorted(m.step for m in client.get_metric_history(k.info.run_id, "evaluated") if m.value)
        assert [m.step for m in client.get_metric_history(k.info.run_id, "score")] == evaluated
        assert [m.step for m in client.get_metric_history(k.info.run_id, "classifier_test_acc")] == [1]
        assert "grid.png" in {a.path for a in client.list_artifacts(k.info.run_id)}
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert finished and all(len(client.get_metric_history(k.info.run_id, "loss")) == epochs for k in finished)
    assert all(len(client.get_metric_history(k.info.run_id, "loss")) < epochs for k in pruned)

    # the persisted Optuna study: full-length trials COMPLETE, stopped ones PRUNED with the
    # evaluations the scheduler saw, each linked both ways with its MLflow run
    study = optuna.load_study(study_name="smoke/all", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 6
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    assert set(by_run) == {k.info.run_id for k in kids}
    for k in kids:
        t = by_run[k.info.run_id]
        assert k.data.tags["harness.optuna_study"] == "smoke/all" and k.data.tags["harness.optuna_trial"] == str(t.number)
        assert t.user_attrs["ray_trial_id"] == k.data.tags["harness.trial_id"]
        assert (t.user_attrs["variant"], t.user_attrs["phase"]) == ("all", "tune")
        scores = {m.step: m.value for m in client.get_metric_history(k.info.run_id, "score")}
        assert t.intermediate_values == pytest.approx(scores)
        if k.info.status == "FINISHED":
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(scores[epochs])
        else:
            assert t.state == optuna.trial.TrialState.PRUNED and t.value is None
            assert t.intermediate_values and max(t.intermediate_values) < epochs
    assert {"loss.cos.on", "loss.bn", "loss.tv"} <= {p for t in study.trials for p in t.params}

    # the parent run carries the outcome; no Ray key on it either
    metrics = parent.data.metrics
    assert metrics["trials_total"] == 6 and metrics["trials_finished"] == len(finished)
    assert metrics["trials_pruned"] + metrics["trials_collapsed"] == len(pruned)
    assert metrics["trials_nonfinite"] == metrics["trials_failed"] == 0
    summary = json.loads((out / "summary.json").read_text())
    best = summary["variants"][0]["best"]
    assert metrics["best_score/all"] == pytest.approx(best["score"])
    assert client.get_run(best["run_id"]).data.metrics["score"] == pytest.approx(best["score"])
    assert "loss.tv=" in parent.data.tags["best_settings/all"]
    assert parent.data.tags["mlflow.note.content"].startswith(f"6 tuning trials ({len(finished)} finished")
    assert summary["counts"]["tune"]["finished"] == len(finished)
    assert not set(metrics) & RAY_INTERNAL
    assert {"summary.json", "optuna.db"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # `harness report` finds the sweep's study (attached to the parent) and states its importance rule
    report = tmp_path / "report"
    assert main(["report", "--experiment", "smoke", "--mlflow-uri", uri, "--out", str(report)]) == 0
    text = (report / "README.md").read_text()
    importance = text.split("### Loss-weight importance (Optuna, per variant)")[1]
    assert "Optuna state COMPLETE" in importance and "no Optuna study was found" not in importance
    assert f"all {len(finished)}/6" in importance
    assert ("importance.png" in importance) == (len(finished) >= 2)


@pytest.fixture
def mlflow_server(tmp_path, fresh_store):
    """A real `mlflow server` on loopback (SQLite backend, proxied artifacts)."""
    port = free_port()
    fresh_store(tmp_path / "server.db")  # its tables made: the server starts without migrating a new store
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              # no job runner: MLflow 3 otherwise starts 7 huey consumer processes for its
                              # GenAI jobs (none of them tracking), which compete with the server's start
                              env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    uri = f"http://127.0.0.1:{port}"
    try:
        # poll the server's /health every half second: MlflowClient retries a refused connection with
        # exponential backoff (7 retries, factor 2), so a first call made before the server listens
        # returns up to half a minute after it does
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        deadline = time.time() + 180
        while time.time() < deadline and server.poll() is None:
            try:
                with direct.open(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except Exception:
                pass
            time.sleep(0.5)
        MlflowClient(uri).search_experiments()
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_faults_retried_and_nan_never_wins_logged_to_a_real_mlflow_server(tmp_path, ray_address, mlflow_server):
    file = write_sweep(tmp_path / "f.yaml", name="faults", axes={"fault": ["raise_once", "nan"]},
                       budget={"num_samples": 1}, base={**TINY, "train": {"epochs": 4, "steps_per_epoch": 2,
                                                                          "batch_size": 20}})
    out = tmp_path / "faults"
    uri = mlflow_server
    proc = subprocess.run(sweep_cmd(file, out, ray_address, "--mlflow-uri", uri), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kids, parents = children(uri, "faults")
    assert len(kids) == 2 and len(parents) == 1
    assert not (out / "mlflow.db").exists()  # everything went to the server, over HTTP
    by_variant = {k.data.tags["harness.variant"]: k for k in kids}
    retried = by_variant["fault=raise_once"]
    assert retried.info.status == "FINISHED" and retried.data.tags.get("harness.retried") == "true"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(retried.info.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]  # resumed after epoch 2, not restarted from 1
    local = MlflowClient(uri).download_artifacts(retried.info.run_id, "grid.png", str(tmp_path))
    assert Path(local).stat().st_size > 0
    nan_run = by_variant["fault=nan"]
    assert nan_run.info.status == "KILLED" and "NaN" in nan_run.data.tags["harness.stop_reason"]
    assert nan_run.data.metrics["score"] == 0 and nan_run.data.metrics["epoch"] == 2
    best_lines = [l for l in proc.stdout.splitlines() if l.startswith("| fault=")]
    assert best_lines and all("fault=nan" not in l for l in best_lines)


def _wait_for_progress(out: Path, min_checkpoints: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list((out / "ray").glob("*/*/checkpoint_*"))) >= min_checkpoints:
            return
        time.sleep(0.5)
    raise AssertionError("the sweep made no progress")


def _persisted_trials(db: Path) -> list[tuple[str, str]]:
    """(state, Ray trial id) of every trial in a sweep's optuna.db, read-only (the driver may be writing)."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("select t.state, a.value_json from trials t join trial_user_attributes a "
                           "on a.trial_id = t.trial_id where a.key = 'ray_trial_id'").fetchall()
    except sqlite3.OperationalError:  # the tables are not there yet
        return []
    finally:
        con.close()


def test_interrupted_then_killed_sweep_resumes_to_exactly_num_samples(tmp_path, ray_address, capsys):
    file = write_sweep(tmp_path / "r.yaml", name="resume", budget={"num_samples": 4},
                       base={**TINY, "train": {"epochs": 4, "steps_per_epoch": 3, "batch_size": 20}},
                       resources={"cpu": 1, "max_concurrent": 2})
    out = tmp_path / "resume"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    # 1. Ctrl-C: the driver ends its runs as KILLED and exits non-zero
    driver = subprocess.Popen(sweep_cmd(file, out, ray_address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_progress(out, 2, timeout=600)
    driver.send_signal(signal.SIGINT)
    driver.communicate(timeout=300)
    assert driver.returncode == 130
    kids, parents = children(uri, "resume")
    assert kids and not [r for r in kids + parents if r.info.status == "RUNNING"], "interrupt left runs RUNNING"
    # the folder resumes only the sweep it holds: another file, an edited one, or a folder made before
    # the folder kept its record (an older layout) is refused with one line, before Ray starts (the
    # entry point `python -m harness.cli` exits with what `main` returns; called here, in this process)
    other = write_sweep(tmp_path / "other.yaml", name="other", budget={"num_samples": 4},
                        base={**TINY, "train": {"epochs": 4, "steps_per_epoch": 3, "batch_size": 20}})
    edited = write_sweep(tmp_path / "edited.yaml", name="resume", budget={"num_samples": 4},
                         base={**TINY, "train": {"epochs": 4, "steps_per_epoch": 3, "batch_size": 10}},
                         resources={"cpu": 1, "max_concurrent": 2})
    older = tmp_path / "older"
    shutil.copytree(out, older)
    (older / "sweep.json").unlink()
    for cmd, words in ((sweep_cmd(other, out, ray_address, "--resume"), ("--resume", "'other'")),
                       (sweep_cmd(edited, out, ray_address, "--resume"), ("--resume", "base.train.batch_size")),
                       (sweep_cmd(file, older, ray_address, "--resume"), ("--resume", "older version"))):
        assert cmd[1:3] == ["-m", "harness.cli"]
        capsys.readouterr()
        returncode = main(cmd[3:])
        stderr = capsys.readouterr().err
        lines = stderr.strip().splitlines()
        assert returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), stderr[-2000:]
    # 2. resume, then SIGKILL the driver mid-run, right after a trial ended: nothing can clean
    # up, and the Optuna study must already hold that trial (written as it ended, not at the end)
    db = out / "optuna.db"
    persisted_before = len(_persisted_trials(db))
    driver = subprocess.Popen(sweep_cmd(file, out, ray_address, "--resume"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while len(_persisted_trials(db)) <= persisted_before:
        assert time.time() < deadline and driver.poll() is None, "no trial reached the Optuna study while running"
        time.sleep(0.3)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    time.sleep(2)  # let Ray reap the dead driver's trial actors
    survived = _persisted_trials(db)
    assert len(survived) > persisted_before and all(state == "COMPLETE" for state, _ in survived)
    # 3. resume to the end
    proc = subprocess.run(sweep_cmd(file, out, ray_address, "--resume"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kids, parents = children(uri, "resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == 4, [(k.data.tags.get("harness.trial_id"), k.info.status) for k in kids]
    assert len({k.data.tags["harness.trial_id"] for k in kids}) == 4
    assert all(k.info.status == "FINISHED" for k in kids)
    client = MlflowClient(uri)
    for k in kids:  # each epoch logged once, also for trials replayed from a checkpoint
        assert [m.step for m in client.get_metric_history(k.info.run_id, "loss")] == list(range(1, 5))
    assert "4 trials (0 failed)" in proc.stdout
    # a trial's checkpoints stayed while it could be resumed (a snapshot may name any of them); once it
    # ended and Tune's saved state recorded so, they went: a finished trial keeps no checkpoint, and the
    # best trial's weights are in its MLflow run (keep_best 1), none on disk
    # (the killed driver may leave the folder of a trial it had started and the resume drew again)
    trial_dirs = [d for d in (out / "ray" / "all").iterdir() if d.is_dir() and d.name.startswith("run_trial")]
    assert all(len(list(d.glob("checkpoint_*"))) <= 1 for d in trial_dirs)
    assert not list((out / "ray").rglob("inverter.pt")) and not list((out / "ray").rglob("state.pt"))
    for k in kids:
        own = [d for d in trial_dirs if d.name.startswith(f"run_trial_{k.data.tags['harness.trial_id']}_")]
        assert len(own) == 1 and not list(own[0].glob("checkpoint_*")), own
        assert {"grid.png", "samples.pt", "metrics.json"} <= {a.path for a in client.list_artifacts(k.info.run_id)}
    best = json.loads((out / "summary.json").read_text())["variants"][0]["best"]
    with_weights = [k.info.run_id for k in kids if "inverter.pt" in {a.path for a in client.list_artifacts(k.info.run_id)}]
    assert with_weights == [best["run_id"]]
    # the study kept what the killed driver wrote and holds each trial once, linked to its run
    study = optuna.load_study(study_name="resume/all", storage=f"sqlite:///{db}")
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(
        k.data.tags["harness.trial_id"] for k in kids)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        assert client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["harness.optuna_trial"] == str(t.number)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_without_address_a_private_ray_starts_even_when_another_runs(ray_address):
    """RAY_ADDRESS makes a plain `ray.init()` join the session's running head, as a user's own
    `ray start --head` (or its stale address file) would; the harness must start its own."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        proc = _python("import ray; from harness.sweep.tune import init_ray; "
                       f"cluster = init_ray(None, num_cpus=1, temp_dir={temp!r}); "
                       "print(ray.get_runtime_context().gcs_address, cluster['CPU']); ray.shutdown()",
                       RAY_ADDRESS=ray_address)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    address, cpus = proc.stdout.split()[-2:]
    assert address != ray_address and float(cpus) == 1.0  # its own instance, with the CPUs it asked for


def test_workers_see_the_drivers_data_and_cache_settings(ray_address, tmp_path):
    """The session's head was started with other settings: the workers get the driver's."""
    proc = _python("import os, ray; from harness.sweep.tune import init_ray; "
                   f"init_ray({ray_address!r}); "
                   "env = ray.remote(lambda: [os.environ.get(k) for k in ('HARNESS_DATA_ROOT', 'HARNESS_CACHE_DIR')]); "
                   "print(*ray.get(env.remote()))",
                   HARNESS_DATA_ROOT=str(tmp_path / "data"), HARNESS_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == [str(tmp_path / "data"), str(tmp_path / "cache")]
