"""The sweep layer's decisions without a Ray cluster: the collapse streak and stopper, the stop
reason logged to MLflow, how Ray is started or reached, what runs on which node."""
import socket
import types

import pytest
import yaml
from mlflow.tracking import MlflowClient

import harness.sweep.tune
from harness.cli import main
from harness.config import ClusterError, ConfigError
from harness.sweep.tune import (CollapseNanStopper, check_shared_storage, collapse_streak, init_ray, trial_resources,
                           worker_env)
from harness.sweep.files import SweepConfig
from tests.conftest import free_port


# -- the collapse streak counts evaluations, not epochs ---------------------------------------
def _rows(evaluated, collapsed):
    return [{"epoch": i + 1, "evaluated": float(e), "collapsed": float(c)}
            for i, (e, c) in enumerate(zip(evaluated, collapsed))]


def test_streak_ignores_epochs_without_an_evaluation():
    # eval_every 2: epochs 3 and 5 repeat the evaluation before them
    rows = _rows([1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 1])
    assert [collapse_streak(rows[:i + 1], 2, 6) for i in range(6)] == [0, 1, 1, 2, 2, 3]
    # a repeated non-collapsed evaluation does not restart anything either
    rows = _rows([1, 1, 0, 1], [1, 0, 0, 1])
    assert [collapse_streak(rows[:i + 1], 2, 4) for i in range(4)] == [1, 0, 0, 1]


def test_streak_skips_evaluations_off_the_schedule():
    # eval_every 2, checkpoints every epoch: epochs 1, 3, 5 are checkpoint-only evaluations (2) past
    # the first; patience counts the scheduled ones (epochs 1, 2, 4, 6) whatever the checkpoints
    rows = _rows([1, 1, 2, 1, 2, 1], [1, 1, 1, 1, 0, 1])
    assert [collapse_streak(rows[:i + 1], 2, 6) for i in range(6)] == [1, 2, 2, 3, 3, 4]


def test_streak_without_the_flag_follows_the_evaluation_schedule():
    rows = [{"epoch": e, "collapsed": 1.0} for e in range(1, 8)]  # eval_every 3, 7 epochs: 1, 3, 6, 7
    assert [collapse_streak(rows[:i + 1], 3, 7) for i in range(7)] == [1, 1, 2, 2, 2, 3, 4]


def test_stopper_patience_is_counted_in_evaluations():
    """collapse_patience 3 with eval_every 2: stop at the third collapsed evaluation (epoch 6),
    not at the third collapsed epoch (epoch 4)."""
    stopper = CollapseNanStopper(patience=3, min_epoch=2)
    rows = _rows([1, 1, 0, 1, 0, 1, 0, 1], [0] + [1] * 7)
    stopped = [r["epoch"] for i, r in enumerate(rows)
               if stopper("t", {**r, "collapse_streak": collapse_streak(rows[:i + 1], 2, 8)})]
    assert stopped[0] == 6
    assert stopper("t", {"epoch": 1, "nonfinite": 1.0})  # a NaN loss stops at once


# -- the stop reason logged to MLflow --------------------------------------------------------
@pytest.mark.parametrize("streak, epoch, reason", [
    (1, 3, "pruned by ASHA at epoch 3"),       # collapsed now, but not for `patience` evaluations
    (3, 3, "stopped: collapsed at 3 evaluations in a row at epoch 3"),
    (3, 1, "pruned by ASHA at epoch 1"),       # before the stopper's minimum epoch
])
def test_trial_is_labelled_collapsed_only_at_the_stoppers_patience(tmp_path, fresh_store, streak, epoch, reason):
    from harness.sweep.tracking import MlflowTrialLogger

    uri = fresh_store(tmp_path / 'm.db')
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp).info.run_id
    logger = MlflowTrialLogger(uri, exp, parent, {}, max_epochs=6, stopper=CollapseNanStopper(3, 2))
    trial = types.SimpleNamespace(trial_id="t1", config={}, last_result={}, checkpoint=None)
    logger.on_trial_result(0, [], trial, {"epoch": epoch, "collapsed": 1.0, "collapse_streak": streak, "score": 0.0})
    logger.on_trial_complete(0, [], trial)
    run = client.get_run(logger.runs["t1"])
    assert run.info.status == "KILLED" and run.data.tags["harness.stop_reason"] == reason


# -- starting or reaching Ray ------------------------------------------------------------------
class FakeRay:
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def install(self, monkeypatch):
        import ray
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", self.init)
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}},
                                                   {"Alive": False, "Resources": {"CPU": 64.0}}])
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
        return self

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error


@pytest.fixture
def env(monkeypatch):
    for name in ("HARNESS_DATA_ROOT", "HARNESS_CACHE_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HARNESS_DATA_ROOT", "/shared/data")
    monkeypatch.setenv("HARNESS_CACHE_DIR", "/shared/cache")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_worker_env_forwards_only_what_is_set(env):
    assert worker_env() == {"HARNESS_DATA_ROOT": "/shared/data", "HARNESS_CACHE_DIR": "/shared/cache",
                            "OMP_NUM_THREADS": "1"}
    assert worker_env({"PATH": "/bin", "MKL_NUM_THREADS": ""}) == {}


def test_without_address_a_private_instance_is_started(monkeypatch, env):
    ray = FakeRay().install(monkeypatch)
    cluster = init_ray(None, num_cpus=2)
    (call,) = ray.calls
    assert call["address"] == "local"  # never join a Ray that happens to run on this machine
    assert call["object_store_memory"] and call["num_cpus"] == 2
    assert call["runtime_env"] == {"env_vars": {"HARNESS_DATA_ROOT": "/shared/data",
                                                "HARNESS_CACHE_DIR": "/shared/cache", "OMP_NUM_THREADS": "1"}}
    assert cluster["nodes"] == [{"CPU": 2.0}]  # live nodes only


def test_with_address_ray_is_joined_with_the_workers_env(monkeypatch, env):
    ray = FakeRay().install(monkeypatch)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        init_ray(address)
    (call,) = ray.calls
    assert call["address"] == address and "object_store_memory" not in call and "num_cpus" not in call
    assert call["runtime_env"]["env_vars"]["HARNESS_CACHE_DIR"] == "/shared/cache"


def test_ray_start_failure_is_one_line(monkeypatch, env):
    FakeRay(ValueError("When connecting to an existing cluster, object_store_memory must not be provided\n"
                       "more detail")).install(monkeypatch)
    with pytest.raises(ClusterError) as err:
        init_ray(None)
    assert "\n" not in str(err.value) and "object_store_memory must not be provided" in str(err.value)


def _write_sweep(path, **spec):
    path.write_text(yaml.safe_dump({"name": "c", "base": {"train": {"epochs": 2}}, "budget": {"num_samples": 1},
                                    "asha": {"enabled": False}, **spec}))
    return path


def test_unreachable_address_exits_non_zero_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(harness.sweep.tune, "open_tracking", lambda *a, **k: pytest.fail("tracking opened"))
    file = _write_sweep(tmp_path / "s.yaml")
    out = tmp_path / "out"
    code = main(["sweep", str(file), "--out", str(out), "--address", f"127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1 and "nothing answers there" in err and "Traceback" not in err
    assert not out.exists()


# -- clusters: shared storage and per-node resources -----------------------------------------
class Reached(Exception):
    """Raised where the driver would open the MLflow parent run: every check before it passed."""


def test_multi_node_cluster_needs_shared_storage(tmp_path, capsys, monkeypatch):
    two_nodes = {"CPU": 4.0, "nodes": [{"CPU": 2.0}, {"CPU": 2.0}]}
    monkeypatch.setattr(harness.sweep.tune, "init_ray", lambda address, **k: two_nodes)

    def reached(*args, **kwargs):
        raise Reached
    monkeypatch.setattr(harness.sweep.tune, "open_tracking", reached)
    file = _write_sweep(tmp_path / "s.yaml")
    out = tmp_path / "out"
    assert main(["sweep", str(file), "--out", str(out), "--address", "10.0.0.1:6379"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shared-storage" in err and "2 nodes" in err and str(out) in err
    assert not out.exists()
    with pytest.raises(Reached):
        main(["sweep", str(file), "--out", str(out), "--address", "10.0.0.1:6379", "--shared-storage"])


@pytest.mark.parametrize("cluster, address, shared", [
    ({"CPU": 2.0, "nodes": [{"CPU": 2.0}]}, "127.0.0.1:6379", False),  # one node: its own disk is shared
    ({"CPU": 4.0, "nodes": [{"CPU": 2.0}, {"CPU": 2.0}]}, "10.0.0.1:6379", True),  # the user says so
    ({"CPU": 4.0, "nodes": [{"CPU": 2.0}, {"CPU": 2.0}]}, None, False),  # no --address: private instance
])
def test_shared_storage_check_passes(cluster, address, shared, tmp_path):
    check_shared_storage(address, cluster, shared, tmp_path, "/cache")


def test_cpu_request_is_checked_against_the_largest_node():
    sweep = SweepConfig.model_validate({"name": "r", "resources": {"cpu": 6}})
    with pytest.raises(ConfigError, match="resources.cpu: 6 per trial but the largest node has 4 CPUs"):
        trial_resources(sweep, {"CPU": 8.0, "nodes": [{"CPU": 4.0}, {"CPU": 4.0}]})
    assert trial_resources(sweep, {"CPU": 10.0, "nodes": [{"CPU": 4.0}, {"CPU": 6.0}]}) == {"cpu": 6, "gpu": 0.0}
    gpu = SweepConfig.model_validate({"name": "r", "resources": {"cpu": 1, "gpu": 2}})
    with pytest.raises(ConfigError, match="resources.gpu: 2.0 per trial but the largest node has 1"):
        trial_resources(gpu, {"CPU": 8.0, "GPU": 2.0, "nodes": [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]})


def test_control_inverts_the_classifier_the_tuned_settings_train():
    from harness.sweep.study import confirm_settings, control_settings
    best = {"loss.tv": 0.3, "direct.lr": 0.02, "classifier.weight_decay": 0.002, "data.train_size": 50}
    # the confirmation run of seed 1001 trains its classifier with the tuned weight decay on n = 50;
    # the control of that seed must invert that classifier, with none of the tuned inversion weights
    # by default a confirmation seed also draws the training subset, the same for every variant
    assert confirm_settings(best, 1001) == {**best, "seed": 1001, "classifier.seed": 1001, "data.subset_seed": 1001}
    assert confirm_settings(best, 1001, subset=False) == {**best, "seed": 1001, "classifier.seed": 1001}
    assert control_settings(best, 1001) == {"classifier.weight_decay": 0.002, "data.train_size": 50,
                                            "seed": 1001, "classifier.seed": 1001, "data.subset_seed": 1001}
    assert control_settings({"loss.tv": 0.3}, 7, subset=False) == {"seed": 7, "classifier.seed": 7}


def test_confirmation_seeds_draw_different_training_subsets_paired_across_variants():
    """Known answer on the real data: seeds 1000 and 1001 give different training images; at one
    seed, variants that differ in pooling alone see the same images."""
    from harness.config import build_config
    from harness.science.data import train_subset
    from harness.sweep.study import confirm_settings
    from harness.sweep.files import resolve_trial

    def indices(pool, seed):
        cfg = resolve_trial({"data": {"train_size": 20}, "classifier": {"pool": pool}}, confirm_settings({}, seed))
        return train_subset(cfg.data)[1].tolist()

    assert indices("avg", 1000) == indices("max", 1000)
    assert indices("avg", 1000) != indices("avg", 1001)
    assert build_config({}).data.subset_seed == 0  # a plain run is unchanged


def test_a_trial_stopped_by_the_scheduler_leaves_nothing_alive_in_its_worker(monkeypatch):
    """Ray stops a trial (ASHA, the stopper) by raising inside `tune.report`; with reused actors
    the worker then runs the next trial while that exception may still be held. The stopped
    trial (its data, classifier and evaluator) must not stay alive through the exception's
    traceback: a worker's memory grew by about 200 MB a trial before."""
    import weakref

    import ray
    from ray import tune

    import torch

    import harness.trial
    from tests.conftest import TINY

    alive = []

    class Watched(harness.trial.Trial):
        def __init__(self, cfg):
            super().__init__(cfg)
            alive.append(weakref.ref(self))

    class Stopped(Exception):
        pass

    def report(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(harness.trial, "Trial", Watched)
    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "node"))
    base = {**TINY, "threads": 1}
    threads = torch.get_num_threads()
    with pytest.raises(Stopped) as stopped:
        try:
            harness.sweep.tune.run_trial({}, base, [])
        finally:
            torch.set_num_threads(threads)  # run_trial set the trial's 1 thread
    assert stopped.value.__traceback__ is not None  # the exception, with its frames, is still held here
    assert len(alive) == 1 and alive[0]() is None


def test_prune_checkpoints_keeps_each_trials_last(tmp_path):
    from harness.sweep.tune import prune_checkpoints

    exp = tmp_path / "all"
    for trial, epochs in (("run_trial_a", [0, 1, 2, 9, 10, 11]), ("run_trial_b", [3]), ("run_trial_c", [])):
        (exp / trial).mkdir(parents=True)
        (exp / trial / "result.json").write_text("{}")
        for e in epochs:
            (exp / trial / f"checkpoint_{e:06d}").mkdir()
            (exp / trial / f"checkpoint_{e:06d}" / "inverter.pt").write_text("x")
    (exp / "experiment_state.json").write_text("{}")
    assert prune_checkpoints(exp) == 5
    assert sorted(p.name for p in (exp / "run_trial_a").iterdir()) == ["checkpoint_000011", "result.json"]
    assert sorted(p.name for p in (exp / "run_trial_b").iterdir()) == ["checkpoint_000003", "result.json"]
    assert [p.name for p in (exp / "run_trial_c").iterdir()] == ["result.json"]
    assert (exp / "experiment_state.json").exists()
    assert prune_checkpoints(tmp_path / "absent") == 0


@pytest.mark.parametrize("result, epoch, outcome, reason", [
    # the time budget ended it, whatever else held at that epoch (a collapse streak at the stopper's patience)
    ({"out_of_time": 1.0, "collapse_streak": 3}, 3, "timed_out",
     "stopped: time budget train.max_seconds reached at epoch 3"),
    ({"out_of_time": 1.0}, 6, "finished", "completed the epoch budget (6 epochs)"),  # its last epoch anyway
    ({"out_of_time": 0.0, "train_seconds": 9.0}, 3, "pruned", "pruned by ASHA at epoch 3"),  # the flag decides
    ({"train_seconds": 2.5}, 2, "timed_out", "stopped: time budget train.max_seconds reached at epoch 2"),
    ({"train_seconds": 1.5}, 2, "pruned", "pruned by ASHA at epoch 2"),  # under the limit: ASHA's stop
])
def test_trial_stopped_by_its_time_budget_is_labelled_so(tmp_path, fresh_store, result, epoch, outcome, reason):
    """A trial that `train.max_seconds` ended is not ASHA's: the trainable's `out_of_time` flag says
    so, else the trial's training seconds against its limit (here 2 s)."""
    from harness.sweep.tracking import MlflowTrialLogger

    uri = fresh_store(tmp_path / 'm.db')
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp).info.run_id
    logger = MlflowTrialLogger(uri, exp, parent, {"train": {"epochs": 6, "max_seconds": 2.0}}, max_epochs=6,
                               stopper=CollapseNanStopper(3, 2))
    trial = types.SimpleNamespace(trial_id="t1", config={}, last_result={}, checkpoint=None)
    logger.on_trial_result(0, [], trial, {"epoch": epoch, "collapsed": 1.0, "collapse_streak": 0, "score": 0.1,
                                          **result})
    logger.on_trial_complete(0, [], trial)
    run = client.get_run(logger.runs["t1"])
    assert run.data.tags["harness.stop_reason"] == reason and run.data.tags["harness.outcome"] == outcome
    assert run.info.status == ("FINISHED" if outcome == "finished" else "KILLED")
    assert logger.outcomes["t1"] == outcome


# -- what a sweep keeps on disk ------------------------------------------------------------------
def _experiment_state(exp, trials):
    """An experiment_state-*.json as Tune writes it: per trial its id, status, folder and run
    metadata, whose (pickled) checkpoint manager records the checkpoint registered last."""
    import json

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    data = []
    for trial_id, status, folder, checkpoints in trials:
        meta = _TrainingRunMetadata()
        meta.checkpoint_manager = _CheckpointManager(CheckpointConfig())
        for name in checkpoints:
            meta.checkpoint_manager.register_checkpoint(
                _TrainingResult(checkpoint=Checkpoint(str(exp / folder / name)), metrics={}))
        data.append([json.dumps({"trial_id": trial_id, "status": status, "relative_logdir": folder}),
                     meta.get_json_state()])
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))


def _trial_folder(exp, folder, checkpoints, results=()):
    import json

    (exp / folder).mkdir(parents=True)
    (exp / folder / "result.json").write_text("".join(json.dumps({"checkpoint_dir_name": c}) + "\n" for c in results))
    for name in checkpoints:
        (exp / folder / name).mkdir()
        (exp / folder / name / "state.pt").write_text("state")
        (exp / folder / name / "inverter.pt").write_text(f"weights of {folder}/{name}")
    return exp / folder


def _left(exp, folder):
    return sorted(p.name for p in (exp / folder).iterdir() if p.name != "result.json")


def test_prune_keeps_the_checkpoint_tune_recorded_last_not_the_last_name(tmp_path):
    """A driver killed after a snapshot leaves checkpoints the snapshot never named (checkpoint_000003
    here); the resumed trial continues from the one Tune recorded (000002). Pruning keeps that one:
    Tune's experiment state says which, else the trial's result.json; the folder name does not."""
    from harness.sweep.tune import prune_checkpoints

    exp = tmp_path / "all"
    stray = ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]
    _trial_folder(exp, "run_trial_a_1", stray)  # errored: resumed from its recorded checkpoint on --resume
    _trial_folder(exp, "run_trial_b_2", stray, results=["checkpoint_000001", None, "checkpoint_000002"])  # no record
    _trial_folder(exp, "run_trial_c_3", stray[:2])  # ended, artifacts in MLflow: nothing left to resume
    _trial_folder(exp, "run_trial_d_4", stray[:2])  # ended, but its artifacts were never logged
    _experiment_state(exp, [("a", "ERROR", "run_trial_a_1", stray[:2]),
                            ("c", "TERMINATED", "run_trial_c_3", stray[:2]),
                            ("d", "TERMINATED", "run_trial_d_4", stray[:1])])
    assert prune_checkpoints(exp, ended={"c"}) == 2 + 2 + 2 + 1
    assert _left(exp, "run_trial_a_1") == ["checkpoint_000002"]  # the old rule kept checkpoint_000003
    assert _left(exp, "run_trial_b_2") == ["checkpoint_000002"]
    assert _left(exp, "run_trial_c_3") == []
    assert _left(exp, "run_trial_d_4") == ["checkpoint_000001"]


def test_an_ended_trials_checkpoints_go_once_tunes_saved_state_records_its_end(tmp_path):
    """While the sweep runs: a trial whose end the logger saw keeps its checkpoints until Tune's
    saved experiment state says TERMINATED (a snapshot from before would resume it from them); then
    they go, and only a trial that may be the variant's best keeps its weights. At the run's end the
    best trial's weights go to MLflow and no weights stay on disk."""
    from harness.sweep.storage import CheckpointKeeper

    exp = tmp_path / "all"
    ckpts = ["checkpoint_000000", "checkpoint_000001"]
    for t in "abcd":
        _trial_folder(exp, f"run_trial_{t}", ckpts)
    keeper = CheckpointKeeper(exp, "score", "max", keep_best=1)
    keeper.trial_ended("d", {"epoch": 2, "score": 0.7})
    keeper.trial_ended("a", {"epoch": 2, "score": 0.5})
    keeper.trial_ended("b", {"epoch": 2, "score": 0.7})
    _experiment_state(exp, [(t, "RUNNING", f"run_trial_{t}", ckpts) for t in "abcd"])
    assert keeper.poll(force=True) == 0 and _left(exp, "run_trial_a") == ckpts  # the snapshot predates their end
    # Tune's saved state lists trials in no particular order; its trial list (the sweep's rows) in creation order
    _experiment_state(exp, [(t, "RUNNING" if t == "c" else "TERMINATED", f"run_trial_{t}", ckpts) for t in "dcba"])
    assert keeper.poll(force=True, trials=[types.SimpleNamespace(trial_id=t) for t in "abcd"]) == 3
    assert _left(exp, "run_trial_a") == []  # b ranks above it: not the best
    # as good as b: which of the two the final ranking picks depends on an order not known yet, so both keep
    assert _left(exp, "run_trial_d") == ["inverter.pt"]
    assert _left(exp, "run_trial_b") == ["inverter.pt"]
    assert (exp / "run_trial_b" / "inverter.pt").read_text() == "weights of run_trial_b/checkpoint_000001"
    assert _left(exp, "run_trial_c") == ckpts  # still running: untouched
    keeper.trial_ended("c", {"epoch": 2, "score": 0.9})  # c ends, better than b: b's weights go
    _experiment_state(exp, [(t, "TERMINATED", f"run_trial_{t}", ckpts) for t in "abcd"])
    assert keeper.poll(force=True) == 1
    assert _left(exp, "run_trial_b") == [] and _left(exp, "run_trial_c") == ["inverter.pt"]
    assert _left(exp, "run_trial_d") == []  # c ranks above both b and d now
    _trial_folder(exp, "run_trial_e", ckpts)  # errored: --resume resumes it from what Tune recorded last
    _experiment_state(exp, [(t, "TERMINATED", f"run_trial_{t}", ckpts) for t in "abcd"]
                      + [("e", "ERROR", "run_trial_e", ckpts[:1])])
    logged = []
    keeper.settle([("c", "run-c")], lambda run_id, path: logged.append((run_id, path.read_text())) or True,
                  ended={"a", "b", "c", "d"})
    assert logged == [("run-c", "weights of run_trial_c/checkpoint_000001")]
    assert all(_left(exp, f"run_trial_{t}") == [] for t in "abcd")
    assert _left(exp, "run_trial_e") == ["checkpoint_000000"]
