"""Test set-up: real MNIST/FashionMNIST from the project's shared data folder (no internet here),
a fresh classifier cache per test session, and small configurations that still run the real code."""
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_shared = REPO.parent / "shared" / "datasets"
if "HARNESS_DATA_ROOT" not in os.environ and _shared.is_dir():
    os.environ["HARNESS_DATA_ROOT"] = str(_shared)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The suite runs in N processes (pytest-xdist, `-n` in pyproject.toml): each gets its share of the
# cores for torch and the math libraries (at least one thread), and so do the processes it starts
# (Ray trials, benchmarks). With more processes than cores (3 on a 2-core machine) they share the
# cores: most of a test's time is spent waiting on processes it started, not computing.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(max(1, _cores // _WORKERS)))


def pytest_collection_modifyitems(config, items):
    """pytest-xdist hands the tests out in collection order: the report's study (the longest chain of
    work, one worker's) first, then the other tests that run Ray trials, then the rest, so that no
    minutes-long test starts when the others are nearly done. The files' order is kept otherwise."""
    def rank(item) -> int:
        if item.path.name == "test_report.py":
            return 0
        uses_ray = item.get_closest_marker("sweep") is not None or "ray_address" in getattr(item, "fixturenames", ())
        return 1 if uses_ray else 2
    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """One classifier/evaluator cache shared by every test of the session, and by the session's
    xdist workers: each worker's temp folder lies in the run's, and the cache's per-entry lock lets
    one worker build an entry while the others wait for it instead of building it again."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("cache")
    os.environ["HARNESS_CACHE_DIR"] = str(path)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch
        torch.set_num_threads(int(threads))
    return path


# A trial small enough for a test: 200 training images, 2 classifier epochs, 1 evaluator epoch,
# 2 generator epochs of 3 steps, 10 evaluation images per class.
TINY = {
    "data": {"train_size": 200},
    "classifier": {"epochs": 2},
    "evaluator": {"epochs": 1},
    "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 20},
    "eval": {"per_class": 10, "topk": 3, "diversity_pairs": 20, "reference_per_class": 10},
}


def tiny_overrides(**extra) -> list[str]:
    from harness.config import flatten

    return [f"{k}={v}" for k, v in flatten(TINY).items()] + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture
def tiny_config():
    from harness.config import build_config

    def make(*overrides: str):
        return build_config(TINY, list(overrides))
    return make


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store whose tables MLflow has created: once per process, not once per
    test (creating them runs MLflow's schema migrations, about 6 s of CPU on this machine)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def fresh_store(mlflow_store_template):
    """`fresh_store(path)` puts a new, empty MLflow SQLite store at `path` (a copy of the template:
    the same schema and the same single Default experiment a first connection would create) and
    returns its tracking URI."""
    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mlflow_store_template, path)
        return f"sqlite:///{path}"
    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_root(tmp_path_factory) -> Path:
    """The folder every process of this test session shares: the run's temp folder (each xdist
    worker's own lies in it), or the session's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def ray_address(session_cache, tmp_path_factory):
    """One real Ray head on loopback for the whole test session, shared by its xdist workers: the
    first worker that needs it starts it, the others connect, and the last one done stops it (a
    count under a file lock). 6 logical CPUs on this 2-core machine: the tests' tiny trials spend
    most of their time starting up and writing, not computing, and the CPUs cap how many of all the
    workers' trials run at once."""
    import fcntl
    import json

    root = _session_root(tmp_path_factory)
    record = root / "ray_head.json"
    with open(root / "ray_head.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        head = json.loads(record.read_text()) if record.exists() else None
        if head is None:
            port = free_port()
            # short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket address
            # (pytest's own temp folders, one level deeper per xdist worker, come close to that)
            temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
            # no default workers prestarted for the first driver: the harness's trials run in workers with
            # its runtime environment (the data and cache settings), never in those
            env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                       RAY_prestart_worker_first_driver="0")
            subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=6",
                            "--num-gpus=0", "--include-dashboard=false", "--object-store-memory=150000000",
                            "--disable-usage-stats", f"--temp-dir={temp}"],
                           check=True, env=env, capture_output=True, timeout=120)
            head = {"address": f"127.0.0.1:{port}", "temp": temp, "users": 0}
        head["users"] += 1
        record.write_text(json.dumps(head))
    yield head["address"]
    with open(root / "ray_head.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        head = json.loads(record.read_text())
        head["users"] -= 1
        if head["users"] > 0:
            record.write_text(json.dumps(head))
            return
        record.unlink()
        stop_processes_of(head["temp"])
        shutil.rmtree(head["temp"], ignore_errors=True)


def stop_processes_of(temp: str) -> None:
    """End this session's Ray head only: the processes started with its temp folder and their
    children (workers and agents rename themselves). `ray stop` would end every Ray on the
    machine, other users' included."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                roots.append(proc)
        except psutil.Error:
            continue
    procs = {}
    for root in roots:
        try:
            procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


