"""A sweep across two Ray nodes: a head and a worker started with `ray start` on this machine (each
with its own CPUs, custom resource and temp folder), the sweep run through `--address` with
`--shared-storage`. Trials must run on both nodes, every trial must reach MLflow and Optuna
exactly once, and the classifier must be trained once for the whole cluster."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY, free_port, stop_processes_of

pytestmark = pytest.mark.sweep

TRIALS = 4
# (no default workers prestarted for the first driver: the trials run in workers with the harness's runtime env)
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_prestart_worker_first_driver": "0"}


def ray_start(temp: str, *args: str) -> None:
    subprocess.run(["ray", "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                    "--object-store-memory=80000000", "--disable-usage-stats", f"--temp-dir={temp}", *args],
                   check=True, env=dict(os.environ, **RAY_ENV), capture_output=True, timeout=120)


def cluster_nodes(address: str) -> dict[str, dict]:
    """Node id -> resources of the live nodes, as the cluster reports them."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % address)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **RAY_ENV))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def two_nodes():
    """(address, {node id: "head" | "worker"}) of a 2-node cluster, 1 CPU per node; stopped after."""
    # one short folder holds both nodes' temp folders (Ray's socket paths must fit in 107
    # characters), so that ending the processes started with it ends this cluster and no other
    root = tempfile.mkdtemp(prefix="ray2n")
    head, worker = f"{root}/head", f"{root}/worker"
    address = f"127.0.0.1:{free_port()}"
    try:
        ray_start(head, "--head", f"--port={address.rsplit(':', 1)[1]}", "--include-dashboard=false",
                  '--resources={"two_nodes_head": 1}')
        ray_start(worker, f"--address={address}", '--resources={"two_nodes_worker": 1}')
        nodes = {}
        for _ in range(20):  # the worker registers with the head within seconds
            nodes = cluster_nodes(address)
            if len(nodes) == 2:
                break
            time.sleep(1)
        assert len(nodes) == 2, nodes
        roles = {node: "head" if "two_nodes_head" in res else "worker" for node, res in nodes.items()}
        assert sorted(roles.values()) == ["head", "worker"]
        yield address, roles
    finally:
        stop_processes_of(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_sweep_runs_on_two_nodes_and_records_every_trial_once(tmp_path, two_nodes):
    address, roles = two_nodes
    cache = Path(os.environ["HARNESS_CACHE_DIR"])  # the session's cache: the same path on both nodes
    spec = {
        "name": "two_nodes",
        # a classifier seed no other test uses: its cache entry does not exist before this sweep
        "base": {**TINY, "classifier": {**TINY["classifier"], "seed": 20},
                 "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 20}},
        "search": {"loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5}},
        "budget": {"num_samples": TRIALS},
        "asha": {"enabled": False},
        "resources": {"cpu": 1, "max_concurrent": 2},  # 2 at once, 1 CPU per node: one on each node
        "checkpoint_every": 1,
        "tpe_startup_trials": TRIALS,
        "stop": {"collapse_patience": 100},
    }
    file = tmp_path / "two_nodes.yaml"
    file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "harness.cli", "sweep", str(file), "--out", str(out), "--address", address]

    # without --shared-storage the driver refuses a cluster of several nodes, before writing anything
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert refused.returncode != 0 and "--shared-storage" in refused.stderr and "2 nodes" in refused.stderr
    assert not out.exists()

    before = set(cache.glob("classifier-*.pt"))
    proc = subprocess.run(cmd + ["--shared-storage"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = json.loads((out / "summary.json").read_text())["variants"][0]["rows"]
    assert len(rows) == TRIALS and len({r["trial_id"] for r in rows}) == TRIALS
    assert all(r["outcome"] == "finished" for r in rows)
    # the trials ran on both nodes, and each said which
    nodes = {r["metrics"]["node_id"] for r in rows}
    assert set(roles) == nodes, (nodes, roles)

    # every trial is one MLflow child run (with the node it ran on) and one Optuna trial
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("two_nodes")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == TRIALS + 1 and len(kids) == TRIALS
    assert sorted(k.data.tags["harness.trial_id"] for k in kids) == sorted(r["trial_id"] for r in rows)
    by_trial = {r["trial_id"]: r for r in rows}
    assert all(k.data.tags["harness.node_id"] == by_trial[k.data.tags["harness.trial_id"]]["metrics"]["node_id"]
               for k in kids)
    assert {k.info.status for k in kids} == {"FINISHED"}
    study = optuna.load_study(study_name="two_nodes/all", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == TRIALS
    assert sorted(t.user_attrs["mlflow_run_id"] for t in study.trials) == sorted(k.info.run_id for k in kids)
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(by_trial)

    # the classifier was trained once, by one trial on one node; every other trial loaded it
    keys = {r["metrics"]["classifier_cache_key"] for r in rows}
    assert len(keys) == 1
    entry = cache / f"classifier-{keys.pop()}.pt"
    # (the other xdist workers share this cache and may add entries of their own meanwhile)
    assert entry not in before and entry.is_file()
    assert sorted(r["metrics"]["classifier_cache_hit"] for r in rows) == [0.0] + [1.0] * (TRIALS - 1)
