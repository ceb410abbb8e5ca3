"""`harness sweep`: Ray Tune runs the trials, Optuna (seeded TPE) picks loss weights, ASHA and a
collapse/NaN stopper prune, MLflow records every trial. A thin layer over `harness.trial.Trial`.

Output folder DIR (default ./runs/<sweep name>):
  DIR/ray/<variant>/   Ray Tune storage per variant: experiment state, each trial's small files, and its
                       checkpoints only while it can still be resumed (harness.sweep.storage)
  DIR/mlflow.db        MLflow store (unless --mlflow-uri), artifacts under DIR/mlartifacts
  DIR/optuna.db        the Optuna studies, one per variant, each trial written as it ends
  DIR/summary.json     per variant: trial counts by outcome, the best trial, every trial
The parent MLflow run carries the outcome too: counts and best scores as metrics, the best
settings as tags, summary.json and optuna.db as artifacts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.config import ClusterError, ConfigError
from harness.records.results import best_trials, enters_averages, enters_counts, finite
from harness.report.verdicts import COUNTED
from harness.sweep.files import (OFF_SUFFIX, SweepConfig, check_resume, clean_searched, resolve_trial, sweep_record,
                                 write_record)
from harness.sweep.storage import prune_checkpoints  # noqa: F401  (harness.sweep.tune.prune_checkpoints)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


# --------------------------------------------------------------------------------------------
# The trainable: runs inside a Ray worker.
# --------------------------------------------------------------------------------------------
def _write_checkpoint(trial, directory: Path) -> None:
    """Resumable state plus the images and metrics (so a pruned trial still has its grid)."""
    torch.save(trial.state_dict(), directory / STATE_FILE)
    trial.write_outputs(directory)


def run_trial(config: dict, base: dict, checkpoint_epochs: list[int]) -> None:
    """Ray Tune function trainable: `config` holds the searched settings (dotted keys); `base`
    sets `threads` to the trial's CPUs. Every result names the Ray node the trial ran on
    (`node_id`; Tune's own `hostname` and `node_ip` do not tell apart nodes on one machine)."""
    import ray
    from ray import tune

    from harness.trial import Trial

    cfg = resolve_trial(base, clean_searched(config))
    torch.set_num_threads(cfg.threads)
    trial = Trial(cfg)
    try:
        node_id = ray.get_runtime_context().get_node_id()
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                trial.load_state_dict(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False))
        while not trial.done:
            row = trial.step(evaluate=trial.epoch + 1 in checkpoint_epochs)  # a checkpoint's outputs are evaluated
            streak = collapse_streak(trial.history, cfg.train.eval_every, cfg.train.epochs)
            result = {**row, "collapse_streak": streak, "classifier_cache_key": trial.classifier_info["cache_key"],
                      "classifier_cache_hit": float(trial.classifier_info["cache_hit"]),
                      "setup_seconds": trial.setup_seconds, **trial.classifier_metrics,
                      "evaluator_heldout_acc": trial.evaluator_info["heldout_acc"], "node_id": node_id,
                      "out_of_time": float(trial.out_of_time)}  # train.max_seconds ended it (tracking's label)
            if trial.epoch in checkpoint_epochs or trial.done:
                with tempfile.TemporaryDirectory() as tmp:
                    _write_checkpoint(trial, Path(tmp))
                    tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))
            else:
                tune.report(result)
    finally:
        # A reused actor runs trial after trial: a trial stopped by the scheduler ends in an exception
        # whose traceback keeps this frame, and with it the trial's data and models, alive. Drop them.
        del trial
        release_memory()


def release_memory() -> None:
    """Collect, then hand freed heap pages back to the system (glibc's malloc_trim; elsewhere a no-op),
    so that a worker's resident memory does not grow with every trial it has run."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------
# Settings every trial process must see as the driver does, wherever Ray starts it: the data,
# the classifier cache, and the threading of the math libraries (only those that are set).
WORKER_ENV = ("HARNESS_DATA_ROOT", "HARNESS_CACHE_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_env(environ=None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in WORKER_ENV if environ.get(name)}


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at HOST:PORT."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--address {address}: not HOST:PORT (e.g. 10.0.0.1:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ClusterError(f"--address {address}: nothing answers there ({exc.strerror or exc}); start the "
                           "cluster with `ray start --head` or fix the address") from None


def init_ray(address: str | None, num_cpus: int | None = None, temp_dir: str | None = None) -> dict:
    """Connect to the Ray cluster at `address`, or without one start a private local instance
    (never a Ray that happens to run on this machine: `ray.init()` would join it). Returns the
    cluster's resources: totals, plus `nodes`, the resources of each live node."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # checkpoints at every ASHA rung can be frequent in tiny sweeps; the warning is noise there
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        env = worker_env()
        kwargs = {"log_to_driver": False, "runtime_env": {"env_vars": env} if env else None}
        if address and address != "local":
            _check_reachable(address)
        else:
            kwargs.update(address="local", object_store_memory=150 * 1024 ** 2, include_dashboard=False)
            if num_cpus:
                kwargs["num_cpus"] = num_cpus
            if temp_dir:
                kwargs["_temp_dir"] = temp_dir
        try:
            ray.init(address=kwargs.pop("address", address), **kwargs)
        except Exception as exc:
            where = f"--address {address}" if address and address != "local" else "a private local Ray instance"
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ClusterError(f"{where}: Ray did not start ({type(exc).__name__}: {first})") from None
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return {**ray.cluster_resources(), "nodes": nodes}


def check_shared_storage(address: str | None, cluster: dict, shared_storage: bool, out_dir: Path,
                         cache: str) -> None:
    """On a cluster of several nodes, Tune's checkpoints (under --out) and the classifier cache
    must be on storage every node sees at the same path, or each node silently trains its own
    classifier under the same cache key. The user says so with --shared-storage."""
    nodes = len(cluster.get("nodes", [None]))
    if not address or shared_storage or nodes <= 1:
        return
    raise ConfigError(f"--shared-storage: the Ray cluster at {address} has {nodes} nodes, which must all "
                      f"reach --out ({out_dir}) and the classifier cache ({cache}) at the same paths; put both "
                      "on shared storage (e.g. NFS; the cache via HARNESS_CACHE_DIR) and pass --shared-storage")


def trial_resources(sweep: SweepConfig, cluster: dict) -> dict[str, float]:
    """CPU/GPU per trial from the file, never asking for more than one node has: a trial runs
    on one node, so a request above the largest node would leave it pending forever."""
    nodes = cluster.get("nodes") or [cluster]
    gpus = cluster.get("GPU", 0)
    r = sweep.resources
    gpu = (r.gpu_fraction if gpus else 0.0) if r.gpu == "auto" else float(r.gpu)
    if gpu > 0 and not gpus:
        raise ConfigError(f"resources.gpu: {gpu} asked for but the Ray cluster has no GPU; use gpu: auto or 0")
    largest_gpu = max(n.get("GPU", 0) for n in nodes)
    if gpu > largest_gpu:
        raise ConfigError(f"resources.gpu: {gpu} per trial but the largest node has {largest_gpu:g}; lower it")
    largest_cpu = max(n.get("CPU", 0) for n in nodes)
    if r.cpu > largest_cpu:
        raise ConfigError(f"resources.cpu: {r.cpu:g} per trial but the largest node has {largest_cpu:g} CPUs; lower it")
    return {"cpu": r.cpu, "gpu": gpu}


def checkpoint_epochs(sweep: SweepConfig, max_epochs: int) -> list[int]:
    """Every `checkpoint_every` epochs, plus each ASHA rung (where a trial may be stopped)."""
    epochs = set(range(sweep.checkpoint_every, max_epochs + 1, sweep.checkpoint_every))
    if sweep.asha.enabled:
        rung = sweep.asha.grace_period
        while rung < max_epochs:
            epochs.add(int(rung))
            rung *= sweep.asha.reduction_factor
    return sorted(epochs | {max_epochs})


def was_evaluated(row: dict, eval_every: int, epochs: int) -> bool:
    """Whether an epoch's row holds a fresh evaluation on the trial's schedule (the first epoch,
    every `eval_every`-th, the last) rather than the last one repeated: the trial's `evaluated`
    flag (1) where the row has one. An evaluation off the schedule (`evaluated` 2: a checkpoint's)
    is not counted, so that how often a sweep checkpoints does not change when the stopper fires."""
    if "evaluated" in row:
        return row["evaluated"] == 1
    epoch = int(row["epoch"])
    return epoch == 1 or epoch % eval_every == 0 or epoch >= epochs


def collapse_streak(history: list[dict], eval_every: int, epochs: int) -> int:
    """Scheduled evaluations in a row, up to the latest, that found the generator collapsed. Epochs
    between them (repeats, or a checkpoint's extra evaluation) neither extend nor restart the streak."""
    streak = 0
    for row in history:
        if was_evaluated(row, eval_every, epochs):
            streak = streak + 1 if row.get("collapsed") else 0
    return streak


class CollapseNanStopper:
    """Stop a trial at once when its loss is NaN/inf, or when it has been collapsed for
    `patience` evaluations in a row past `min_epoch`. (ASHA alone stops neither.)"""

    def __init__(self, patience: int, min_epoch: int):
        self.patience, self.min_epoch = patience, min_epoch

    def __call__(self, trial_id: str, result: dict) -> bool:
        return bool(result.get("nonfinite")) or self.collapsed(result)

    def collapsed(self, result: dict) -> bool:
        """Whether this rule stops a trial for collapse at `result` (the tracking callback asks it
        to tell the stopper's stops from ASHA's)."""
        return result.get("epoch", 0) >= self.min_epoch and result.get("collapse_streak", 0) >= self.patience

    def stop_all(self) -> bool:
        return False


def make_stopper(sweep: SweepConfig):
    from ray.tune.stopper import Stopper

    class _Stopper(CollapseNanStopper, Stopper):
        pass
    return _Stopper(sweep.stop.collapse_patience, sweep.stop.collapse_min_epoch)


@dataclass
class VariantOutcome:
    variant: str
    settings: dict
    rows: list[dict] = field(default_factory=list)  # one per trial: config + last metrics + outcome
    errors: int = 0
    interrupted: bool = False
    phase: str = "tune"


def run_variant(sweep: SweepConfig, variant: str, settings: dict, out_dir: Path, resources: dict,
                tracking, phase: str, resume: bool,
                fixed_params: list[dict] | None = None, trial_base: dict | None = None) -> VariantOutcome:
    """Tune one variant: Optuna + ASHA over `sweep.search` (or the `fixed_params` list, one
    trial each, no search), every trial logged under the parent MLflow run. `trial_base` is the
    variant's trial config before searched values (`sweep.trial_base(settings)` when not given):
    a study builds it once per variant for all its phases."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from harness.sweep.storage import CheckpointKeeper
    from harness.sweep.tracking import TAG_PHASE, TAG_VARIANT, MlflowTrialLogger

    # the trial's torch threads are its CPUs: set here, the one config both the trial and its
    # MLflow params come from
    base = {**(trial_base if trial_base is not None else sweep.trial_base(settings)),
            "threads": max(1, int(resources["cpu"]))}
    max_epochs = resolve_trial(base, {}).train.epochs
    storage = (out_dir / "ray").resolve()
    exp_name = f"{phase}-{variant}" if phase != "tune" else variant
    exp_path = storage / exp_name
    parent_id, experiment_id, uri = tracking
    fixed = dict(enumerate(fixed_params)) if fixed_params is not None else None
    # one trainable for a fresh run and its resumption: Tuner.restore refuses another function's name
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, checkpoint_epochs=checkpoint_epochs(sweep, max_epochs))
        if fixed is None else
        tune.with_parameters(_run_fixed, base=base, fixed=fixed, checkpoint_epochs=checkpoint_epochs(sweep, max_epochs)),
        resources)
    objectives = sweep.objectives or {sweep.metric: sweep.mode}
    recorder = None
    if fixed_params is None and sweep.search:  # an Optuna search: persist its study trial by trial
        from harness.records.optuna_study import StudyRecorder, storage_url
        recorder = StudyRecorder(storage_url(out_dir), f"{sweep.name}/{exp_name}",
                                 ["maximize" if m == "max" else "minimize" for m in objectives.values()],
                                 list(objectives), sweep.search,
                                 {"mlflow_parent_run_id": parent_id, "mlflow_experiment_id": experiment_id,
                                  "variant": variant, "phase": phase})
    stopper = make_stopper(sweep)  # Ray's Stopper; the logger gets its plain (picklable) rule
    # removes a trial's checkpoints once it has ended, its artifacts are in MLflow and Tune's saved state says so
    keeper = CheckpointKeeper(exp_path, sweep.metric, sweep.mode, sweep.keep_best, sweep.keep_weights)
    logger = MlflowTrialLogger(uri, experiment_id, parent_id, base, max_epochs,
                               tags={TAG_VARIANT: variant, TAG_PHASE: phase}, fixed=fixed,
                               metric=sweep.metric, objectives=list(objectives), recorder=recorder,
                               stopper=CollapseNanStopper(stopper.patience, stopper.min_epoch), keeper=keeper)
    if resume and tune.Tuner.can_restore(str(exp_path)):
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_errored=True,
                                   resume_unfinished=True, restart_errored=False)
        previous = tuner.get_results()
        logger.adopt_existing({r.metrics.get("trial_id") for r in previous if r.metrics} |
                              _trial_ids_in_state(exp_path))
        # the restored Tuner keeps its own pickled callbacks: re-attach ours (fresh client)
        _replace_callbacks(tuner, logger)
        results = tuner.fit()
    else:
        scheduler = (ASHAScheduler(time_attr="training_iteration", metric=sweep.metric, mode=sweep.mode,
                                   max_t=max_epochs, grace_period=sweep.asha.grace_period,
                                   reduction_factor=sweep.asha.reduction_factor)
                     if sweep.asha.enabled else FIFOScheduler())
        concurrency = sweep.resources.max_concurrent
        if fixed_params is not None:
            param_space = {"__fixed__": tune.grid_search(list(range(len(fixed_params))))}
            tune_config = tune.TuneConfig(scheduler=scheduler, num_samples=1, reuse_actors=True,
                                          max_concurrent_trials=concurrency)
        elif sweep.search:
            import optuna
            sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=sweep.tpe_startup_trials,
                                                 multivariate=len(objectives) == 1)
            searcher = OptunaSearch(space=DefineByRunSpace(sweep.search), metric=list(objectives) if len(objectives) > 1 else sweep.metric,
                                    mode=list(objectives.values()) if len(objectives) > 1 else sweep.mode,
                                    sampler=sampler, seed=sweep.seed)
            searcher = ConcurrencyLimiter(searcher, max_concurrent=concurrency or 2 ** 31 - 1)
            param_space = {}
            tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=sweep.budget.num_samples,
                                          reuse_actors=True)
        else:
            param_space = {"seed": tune.grid_search([base.get("seed", 0) + i for i in range(sweep.budget.num_samples)])}
            tune_config = tune.TuneConfig(scheduler=scheduler, num_samples=1, reuse_actors=True,
                                          max_concurrent_trials=concurrency)
        run_config = tune.RunConfig(
            name=exp_name, storage_path=str(storage), callbacks=[logger], stop=stopper,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # every checkpoint is kept while the run goes on: with num_to_keep, Tune deletes a trial's older
            # checkpoints before its next state snapshot, so a driver killed in between leaves a snapshot that
            # names a deleted checkpoint, and --resume fails that trial ("does not exist on storage");
            # the CheckpointKeeper removes a trial's checkpoints only once the saved state records it as ended
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None), verbose=0)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
        results = tuner.fit()
    expected = len(fixed_params) if fixed_params is not None else sweep.budget.num_samples
    outcome = VariantOutcome(variant, settings, interrupted=_interrupted(results, logger, expected), phase=phase)
    for result in results:
        if result.error is not None:
            outcome.errors += 1
        metrics = dict(result.metrics or {})
        cfg = logger.settings_of(result.config or {})
        trial_id = metrics.get("trial_id")
        outcome.rows.append({"variant": variant, "trial_id": trial_id, "config": cfg,
                             "metrics": metrics, "error": result.error is not None,
                             "outcome": logger.outcomes.get(trial_id, "failed" if result.error else "interrupted"),
                             "run_id": logger.runs.get(trial_id), "optuna_trial": logger.optuna_numbers.get(trial_id)})
    settle_checkpoints(outcome, keeper, logger, sweep)
    return outcome


def settle_checkpoints(outcome: VariantOutcome, keeper, logger, sweep: SweepConfig) -> None:
    """After a variant's run (Tune has written its final state): the checkpoints of every trial that
    ended go; once the run is complete (not interrupted), the weights of the `keep_best` best trials
    go to their MLflow runs and the other trials keep at most the checkpoint Tune recorded last
    (an errored trial resumes from it). An interrupted run keeps the checkpoints of its unfinished trials."""
    try:
        keeper.set_order(r["trial_id"] for r in outcome.rows)  # the order best_rows breaks ties by
        keeper.poll(force=True)
        if not outcome.interrupted:
            best = best_rows([outcome], sweep.metric, sweep.mode, top=sweep.keep_best) if sweep.keep_best else []
            keeper.settle([(r["trial_id"], r["run_id"]) for r in best if not logger.has_weights(r["run_id"])],
                          logger.log_weights, logger.archived)
    except Exception as exc:  # disk hygiene must not fail a sweep that ran
        log.warning("could not clean up the checkpoints of %s: %s", outcome.variant, exc)


def _run_fixed(config: dict, base: dict, fixed: dict, checkpoint_epochs: list[int]) -> None:
    run_trial(fixed[config["__fixed__"]], base, checkpoint_epochs)


class DefineByRunSpace:
    """Optuna define-by-run space (picklable: Tune saves the searcher with the experiment).
    A weight with `allow_off` first draws `<key>.on`; when off it is returned as constant 0."""

    def __init__(self, search: dict):
        self.search = search

    def __call__(self, trial):
        constants = {}
        for key, d in self.search.items():
            if d.allow_off and not trial.suggest_categorical(f"{key}{OFF_SUFFIX}", [True, False]):
                constants[key] = 0.0
                continue
            if d.dist == "choice":
                trial.suggest_categorical(key, d.values)
            elif d.dist == "int":
                trial.suggest_int(key, int(d.low), int(d.high))
            else:
                trial.suggest_float(key, d.low, d.high, log=d.dist == "loguniform")
        return constants or None


def _trial_ids_in_state(exp_path: Path) -> set[str]:
    ids = set()
    for state in exp_path.glob("experiment_state-*.json"):
        try:
            text = state.read_text()
        except OSError:
            continue
        ids |= set(re.findall(r'\\"trial_id\\": \\"([0-9a-f_]+)\\"', text))
        ids |= set(re.findall(r'"trial_id": "([0-9a-f_]+)"', text))
    return ids


def _replace_callbacks(tuner, logger) -> None:
    internal = getattr(tuner, "_local_tuner", None)
    run_config = getattr(internal, "_run_config", None)
    if run_config is not None:
        run_config.callbacks = [logger]


# --------------------------------------------------------------------------------------------
# A whole sweep: every variant, one MLflow parent run, a summary.
# --------------------------------------------------------------------------------------------
class SweepInterrupted(RuntimeError):
    pass


def _interrupted(results, logger, expected: int) -> bool:
    """True when Tune returned early (SIGINT): fewer trials than asked for, or a trial that
    neither completed nor errored. (Tune marks interrupted trials TERMINATED in the ResultGrid.)"""
    ids = [(r.metrics or {}).get("trial_id") for r in results]
    return len(ids) < expected or any(i not in logger.ended for i in ids)


def open_tracking(sweep_name: str, out_dir: Path, mlflow_uri: str | None, kind: str, params: dict,
                  resume: bool) -> tuple[str, str, str]:
    from harness.records.optuna_study import storage_url
    from harness.sweep.tracking import (TAG_OPTUNA_STORAGE, client_for, default_tracking_uri, ensure_experiment,
                                  start_parent)

    uri = mlflow_uri or default_tracking_uri(out_dir)
    client = client_for(uri)
    experiment_id = ensure_experiment(client, sweep_name, None if mlflow_uri else out_dir / "mlartifacts")
    parent = start_parent(client, experiment_id, f"{kind}-{sweep_name}", out_dir, kind, params, resume)
    import shlex
    import sys
    client.set_tag(parent, "harness.command", "harness " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    client.set_tag(parent, TAG_OPTUNA_STORAGE, storage_url(out_dir))  # live while the sweep runs
    return parent, experiment_id, uri


def start_driver(sweep: SweepConfig, out_dir: Path, address: str | None, resume: bool, mlflow_uri: str | None,
                 kind: str, params: dict, shared_storage: bool = False) -> tuple[dict, tuple[str, str, str]]:
    """Check the output folder, start/connect Ray, check the cluster can run the trials, and
    only then write anything: open the MLflow parent run.
    Returns (resources per trial, (parent run id, experiment id, tracking URI))."""
    if not resume and (out_dir / "ray").exists() and any((out_dir / "ray").iterdir()):
        raise ConfigError(f"--out: {out_dir} already holds a {kind}; pass --resume to continue it or "
                          "choose another --out")
    record = sweep_record(sweep, kind, params.get("seeds"))
    if resume:
        check_resume(out_dir, record)  # the same sweep as the folder holds, before Ray starts
    cluster = init_ray(address)
    cache = sweep.base.get("cache_dir") or os.environ.get("HARNESS_CACHE_DIR") or "~/.cache/inversion-harness"
    check_shared_storage(address, cluster, shared_storage, out_dir, cache)
    resources = trial_resources(sweep, cluster)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_record(out_dir, record)
    return resources, open_tracking(sweep.name, out_dir, mlflow_uri, kind, params, resume)


@contextlib.contextmanager
def closing_runs(tracking: tuple[str, str, str], kind: str):
    """End the parent and every child still RUNNING however the driver leaves: FINISHED,
    KILLED on interrupt (then exit as KeyboardInterrupt), FAILED on an error."""
    from harness.sweep.tracking import client_for, finish_open_runs

    parent, experiment_id, uri = tracking
    client = client_for(uri)
    try:
        yield client
    except (KeyboardInterrupt, SweepInterrupted):
        finish_open_runs(client, experiment_id, parent, "KILLED", "interrupted: resume with --resume")
        raise KeyboardInterrupt from None
    except BaseException:
        finish_open_runs(client, experiment_id, parent, "FAILED", f"the {kind} driver failed")
        raise
    finish_open_runs(client, experiment_id, parent, "FINISHED", f"{kind} finished")


def run_sweep(sweep: SweepConfig, out_dir: Path, address: str | None = None, resume: bool = False,
              mlflow_uri: str | None = None, shared_storage: bool = False) -> list[VariantOutcome]:
    out_dir = out_dir.resolve()
    resources, tracking = start_driver(sweep, out_dir, address, resume, mlflow_uri, "sweep", sweep.model_dump(),
                                       shared_storage)
    outcomes = []
    with closing_runs(tracking, "sweep") as client:
        for variant, settings in sweep.variants():
            outcome = run_variant(sweep, variant, settings, out_dir, resources, tracking, "tune", resume)
            outcomes.append(outcome)
            record_outcome(client, tracking[0], sweep, outcomes, out_dir, "sweep")
            if outcome.interrupted:
                raise SweepInterrupted(variant)
    return outcomes


OUTCOMES = ("finished", "pruned", "collapsed", "nonfinite", "timed_out", "failed")


def variant_summary(o: VariantOutcome, metric: str, mode: str) -> dict:
    """Counts by outcome, the best trial (`best_rows`' rule) and, for confirmation runs, the mean."""
    counts = {k: sum(r["outcome"] == k for r in o.rows) for k in OUTCOMES}
    if any(r["outcome"] not in OUTCOMES for r in o.rows):
        counts["interrupted"] = sum(r["outcome"] not in OUTCOMES for r in o.rows)
    best = best_rows([o], metric, mode, top=1)
    summary = {"variant": o.variant, "phase": o.phase, "trials": len(o.rows), "counts": counts, "best": None}
    if best:
        b = best[0]
        summary["best"] = {metric: b["metrics"][metric], "settings": b["config"], "trial_id": b["trial_id"],
                           "run_id": b["run_id"], "optuna_trial": b["optuna_trial"], "outcome": b["outcome"],
                           "epoch": b["metrics"].get("epoch")}
    # the report's rule: only trials that ended normally, with a finite loss, are averaged; a count
    # (collapsed) also takes the trials the collapse stopper ended
    counts_stopped = metric in COUNTED
    values = finite(r["metrics"].get(metric) for r in o.rows
                    if (enters_counts(r["outcome"], r["metrics"]) if counts_stopped
                        else enters_averages(r["outcome"], r["metrics"])[0]))
    summary[f"mean_{metric}_finished"] = sum(values) / len(values) if values else None
    return summary


def _metric_key(text: str) -> str:
    """A variant name as part of an MLflow metric/tag key (`pool=avg` -> `pool:avg`)."""
    return re.sub(r"[^\w.\- :/]", ":", text)


def record_outcome(client, parent_id: str, sweep: SweepConfig, outcomes: list[VariantOutcome], out_dir: Path,
                   kind: str) -> dict:
    """Write DIR/summary.json and put the outcome on the parent run: per phase the trial counts by
    outcome (`trials_finished`, ..., `confirm_trials_finished`, ...), per variant the best tuning
    score (`best_<metric>/<variant>`) with its settings as a tag (`best_settings/<variant>`) and the
    mean of the confirmation runs (`confirm_mean_<metric>/<variant>`); summary.json and optuna.db
    as artifacts. Called after every variant, so an interrupted sweep keeps what it finished."""
    from mlflow.entities import Metric

    from harness.sweep.tracking import TAG_NOTE

    metric = sweep.metric
    variants = [variant_summary(o, metric, sweep.mode) for o in outcomes]
    totals: dict[str, dict[str, int]] = {}
    for v in variants:
        phase = totals.setdefault(v["phase"], {})
        for k, n in v["counts"].items():
            phase[k] = phase.get(k, 0) + n
    summary = {"name": sweep.name, "kind": kind, "metric": metric, "mode": sweep.mode,
               "optuna_storage": f"sqlite:///{(out_dir / 'optuna.db').resolve()}", "counts": totals,
               "variants": [{**v, "rows": o.rows} for v, o in zip(variants, outcomes)]}
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1, default=str))

    now, metrics = int(time.time() * 1000), {}
    for phase, counts in totals.items():
        prefix = "" if phase == "tune" else f"{phase}_"
        metrics[f"{prefix}trials_total"] = sum(counts.values())
        metrics.update({f"{prefix}trials_{k}": n for k, n in counts.items()})
    tuning = totals.get("tune", {})
    note = [f"{sum(tuning.values())} tuning trials (" + ", ".join(f"{n} {k}" for k, n in tuning.items()) + ")"]
    for v in variants:
        name = _metric_key(v["variant"])
        if v["phase"] == "tune" and v["best"] is not None:
            metrics[f"best_{metric}/{name}"] = v["best"][metric]
            settings = ", ".join(f"{k}={_short(x)}" for k, x in sorted(v["best"]["settings"].items())) or "-"
            client.set_tag(parent_id, f"best_settings/{name}", settings)
            note.append(f"{v['variant']}: best {metric} {v['best'][metric]:.4g} with {settings}")
        elif v["phase"] != "tune" and v[f"mean_{metric}_finished"] is not None:
            metrics[f"{v['phase']}_mean_{metric}/{name}"] = v[f"mean_{metric}_finished"]
    client.log_batch(parent_id, metrics=[Metric(k, float(x), now, 0) for k, x in metrics.items()])
    client.set_tag(parent_id, TAG_NOTE, "; ".join(note) + ".")  # the parent's Description in the runs table
    client.log_artifact(parent_id, str(path))
    if (out_dir / "optuna.db").exists():
        client.log_artifact(parent_id, str(out_dir / "optuna.db"))
    return summary


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_rows(outcomes: list[VariantOutcome], metric: str, mode: str, top: int = 3) -> list[dict]:
    """The best `top` trials of each variant, by `harness.records.results.best_trials`' rule."""
    out = []
    for o in outcomes:
        out += best_trials(o.rows, metric, mode, top, metrics=lambda r: r["metrics"], failed=lambda r: r["error"])
    return out


def summary_table(rows: list[dict], metric: str) -> str:
    keys = (metric, "ssim_nn_train_mean", "diversity", "evaluator_acc", "collapsed", "epoch")
    header = ["variant", *keys, "searched settings"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        m = r["metrics"]
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in sorted(r["config"].items()) if k != "__fixed__")
        lines.append("| " + " | ".join([r["variant"], *(f"{m.get(k, float('nan')):.4g}" for k in keys),
                                        settings or "-"]) + " |")
    return "\n".join(lines)
