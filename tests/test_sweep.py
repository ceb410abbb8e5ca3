"""The sweep layer on a real Ray head (`ray start --head` on loopback, one per test session) and
a real MLflow store: SQLite, and a real `mlflow server` over HTTP."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

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


def test_smoke_sweep_prunes_and_tracks_every_trial(tmp_path, ray_address):
    out = tmp_path / "smoke"
    proc = subprocess.run(sweep_cmd(REPO / "search_spaces" / "smoke.yaml", out, ray_address,
                                    "--set", "budget.num_samples=4"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| variant | score |" in proc.stdout
    uri = f"sqlite:///{out / 'mlflow.db'}"
    kids, parents = children(uri, "smoke")
    assert len(parents) == 1 and len(kids) == 4
    assert all(k.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for k in kids)
    assert {r.info.status for r in kids + parents} <= {"FINISHED", "KILLED"}
    pruned = [k for k in kids if k.info.status == "KILLED"]
    reasons = [k.data.tags["harness.stop_reason"] for k in pruned]
    assert pruned and all("pruned by ASHA" in r or "collapsed" in r for r in reasons), reasons
    client = MlflowClient(tracking_uri=uri)
    for k in kids:
        assert "loss.cos" in k.data.params and k.data.params["classifier.pool"] == "avg"
        assert k.data.tags["harness.classifier_cache_key"]
        history = client.get_metric_history(k.info.run_id, "score")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        assert "grid.png" in {a.path for a in client.list_artifacts(k.info.run_id)}
    epochs = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())["base"]["train"]["epochs"]
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert finished and all(len(client.get_metric_history(k.info.run_id, "score")) == epochs for k in finished)
    assert all(len(client.get_metric_history(k.info.run_id, "score")) < epochs for k in pruned)
    study = optuna.load_study(study_name="smoke/all", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 4
    assert optuna.importance.get_param_importances(study)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (SQLite backend, proxied artifacts)."""
    port = free_port()
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                MlflowClient(uri).search_experiments()
                break
            except Exception:
                time.sleep(0.5)
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


def test_interrupted_then_killed_sweep_resumes_to_exactly_num_samples(tmp_path, ray_address):
    file = write_sweep(tmp_path / "r.yaml", name="resume", budget={"num_samples": 4},
                       base={**TINY, "train": {"epochs": 5, "steps_per_epoch": 3, "batch_size": 20}},
                       resources={"cpu": 1, "max_concurrent": 2})
    out = tmp_path / "resume"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    # 1. Ctrl-C: the driver ends its runs as KILLED and exits non-zero
    driver = subprocess.Popen(sweep_cmd(file, out, ray_address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_progress(out, 2, timeout=300)
    driver.send_signal(signal.SIGINT)
    driver.communicate(timeout=300)
    assert driver.returncode == 130
    kids, parents = children(uri, "resume")
    assert kids and not [r for r in kids + parents if r.info.status == "RUNNING"], "interrupt left runs RUNNING"
    # 2. resume, then SIGKILL the driver mid-run: nothing can clean up
    done_before = len(list((out / "ray").glob("*/*/checkpoint_*")))
    driver = subprocess.Popen(sweep_cmd(file, out, ray_address, "--resume"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _wait_for_progress(out, done_before + 2, timeout=300)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    time.sleep(2)  # let Ray reap the dead driver's trial actors
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
        assert [m.step for m in client.get_metric_history(k.info.run_id, "loss")] == list(range(1, 6))
    assert "4 trials (0 failed)" in proc.stdout


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_without_address_a_private_ray_starts_even_when_another_runs(ray_address):
    """RAY_ADDRESS makes a plain `ray.init()` join the session's running head, as a user's own
    `ray start --head` (or its stale address file) would; the harness must start its own."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        proc = _python("import ray; from harness.sweep import init_ray; "
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
    proc = _python("import os, ray; from harness.sweep import init_ray; "
                   f"init_ray({ray_address!r}); "
                   "env = ray.remote(lambda: [os.environ.get(k) for k in ('HARNESS_DATA_ROOT', 'HARNESS_CACHE_DIR')]); "
                   "print(*ray.get(env.remote()))",
                   HARNESS_DATA_ROOT=str(tmp_path / "data"), HARNESS_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == [str(tmp_path / "data"), str(tmp_path / "cache")]
