"""What a sweep keeps under DIR/ray/<variant>/, and for how long.

A trial's checkpoints (resumable state: generator, optimiser, RNG, history; and the images, samples
and metrics its MLflow run takes its artifacts from) exist only while the trial can still be
resumed. Tune's own record decides when that ends: the newest `experiment_state-*.json`, the file
`Tuner.restore` reads. Once it records a trial TERMINATED (Tune never runs such a trial again) and
the trial's artifacts are in MLflow, the trial's checkpoint folders are removed; what stays is Tune's
small per-trial files (result.json, progress.csv, params). A trial Tune has not yet recorded as ended
keeps every checkpoint (a snapshot may name any of them), and an errored trial keeps the checkpoint
Tune recorded last: `--resume` resumes errored trials from it.

The inverter's weights of the `keep_best` best trials of a variant (by the summary's rule,
`harness.records.results.best_trials`) go to their MLflow runs as `inverter.pt` once the variant's
run is complete; along the way, a trial that may still be among them keeps its weights as
`<trial folder>/inverter.pt` (a hard link into its last checkpoint, so no copy is written).
With `keep_weights: all` every trial's weights go to MLflow as it ends.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.records.results import budget_reached, qualifies

log = logging.getLogger(__name__)

STATE_GLOB = "experiment_state-*.json"  # Tune's experiment state, one file per driver session
CHECKPOINT_GLOB = "checkpoint_*"
WEIGHTS = "inverter.pt"  # what Trial.write_outputs names the inverter's weights
ENDED = "TERMINATED"  # Tune's status of a trial it will never run again (ERROR trials are resumed)


def newest_state_file(exp_path: Path) -> Path | None:
    """The experiment state Tune restores from: the newest session's file (names sort by time)."""
    files = sorted(Path(exp_path).glob(STATE_GLOB)) if Path(exp_path).is_dir() else []
    return files[-1] if files else None


@dataclass
class TrialRecord:
    """One trial as Tune's saved experiment state records it."""
    trial_id: str
    status: str  # PENDING, RUNNING, PAUSED, TERMINATED or ERROR
    dir_name: str  # the trial's folder, relative to the experiment's
    run_metadata: str = ""  # Tune's JSON of the trial's run metadata (its checkpoint manager, pickled)

    def recorded_checkpoint(self) -> str | None:
        """The folder name of the checkpoint Tune recorded last for this trial (what it would
        resume from), or None where the record holds none or cannot be read."""
        if not self.run_metadata:
            return None
        try:
            from ray.tune.experiment.trial import _TrainingRunMetadata

            latest = _TrainingRunMetadata.from_json_state(self.run_metadata).checkpoint_manager.latest_checkpoint_result
        except Exception as exc:  # another Ray version's layout: fall back on the trial's results
            log.debug("no checkpoint record for %s: %s", self.trial_id, exc)
            return None
        return Path(latest.checkpoint.path).name if latest is not None else None


def read_experiment_state(exp_path: Path) -> dict[str, TrialRecord]:
    """Tune's record of every trial in the newest experiment state, by folder name; {} where there
    is none or it cannot be read (e.g. Tune is writing it: the caller tries again later)."""
    path = newest_state_file(exp_path)
    if path is None:
        return {}
    try:
        state = json.loads(path.read_text())
        records = {}
        for trial_json, run_metadata in state.get("trial_data", []):
            trial = json.loads(trial_json)
            name = trial.get("relative_logdir")
            if name and trial.get("trial_id"):
                records[name] = TrialRecord(str(trial["trial_id"]), str(trial.get("status", "")), name,
                                            run_metadata if isinstance(run_metadata, str) else "")
        return records
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.debug("could not read %s: %s", path, exc)
        return {}


def checkpoint_in_results(trial_dir: Path) -> str | None:
    """The checkpoint the trial's last result with one names (`checkpoint_dir_name` in Tune's
    result.json, appended result by result; a trial replayed after a restore appends again)."""
    latest = None
    try:
        with open(Path(trial_dir) / "result.json") as f:
            for line in f:
                try:
                    name = json.loads(line).get("checkpoint_dir_name")
                except (ValueError, AttributeError):
                    continue
                if name:
                    latest = name
    except OSError:
        return None
    return latest


def latest_checkpoint(trial_dir: Path, record: TrialRecord | None = None) -> Path | None:
    """The checkpoint Tune recorded last for the trial in `trial_dir`: its experiment state's record,
    else the trial's results; the lexically last folder only where neither names one that exists."""
    trial_dir = Path(trial_dir)
    for name in ((record.recorded_checkpoint() if record else None), checkpoint_in_results(trial_dir)):
        if name and (trial_dir / name).is_dir():
            return trial_dir / name
    folders = sorted(p for p in trial_dir.glob(CHECKPOINT_GLOB) if p.is_dir())
    return folders[-1] if folders else None


def remove_checkpoint(path: Path) -> None:
    """Delete one checkpoint folder (the one place the sweep deletes them)."""
    shutil.rmtree(path, ignore_errors=True)


def _link(src: Path, dst: Path) -> bool:
    """`dst` becomes `src`'s file: a hard link (no second copy on disk), else a copy."""
    try:
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return True
    except OSError as exc:
        log.warning("could not keep %s: %s", src, exc)
        return False


def prune_checkpoints(exp_path: Path, ended: Iterable[str] = ()) -> int:
    """Once a variant's run has stopped: a trial that Tune's saved experiment state records as ended
    (TERMINATED) and whose id is in `ended` (its artifacts are in MLflow) loses every checkpoint; every
    other trial keeps the one Tune recorded last (`latest_checkpoint`) and loses older ones. Returns
    how many were removed."""
    exp_path = Path(exp_path)
    if not exp_path.is_dir():
        return 0
    ended = set(ended)
    records = read_experiment_state(exp_path)
    removed = 0
    for trial_dir in sorted(p for p in exp_path.iterdir() if p.is_dir()):
        record = records.get(trial_dir.name)
        done = record is not None and record.status == ENDED and record.trial_id in ended
        keep = None if done else latest_checkpoint(trial_dir, record)
        for folder in sorted(trial_dir.glob(CHECKPOINT_GLOB)):
            if folder != keep and folder.is_dir():
                remove_checkpoint(folder)
                removed += 1
    return removed


def rank_key(metrics: dict[str, Any], metric: str, mode: str) -> tuple[float, float]:
    """`best_trials`' order as a key (smaller is better): more epochs first, then the better metric."""
    value = float(metrics[metric])
    return -budget_reached(metrics), -value if mode == "max" else value


class CheckpointKeeper:
    """Removes an ended trial's checkpoints while the sweep runs (the tracking callback hands it each
    trial whose artifacts it logged), as soon as Tune's saved experiment state records the trial as
    ended; keeps the weights of trials that may be among the variant's best. Picklable (Tune saves
    its callbacks with the experiment)."""

    POLL_SECONDS = 2.0  # how often, at most, the experiment state file is looked at

    def __init__(self, exp_path: Path, metric: str, mode: str, keep_best: int = 1, keep_weights: str = "best"):
        self.exp_path, self.metric, self.mode = Path(exp_path), metric, mode
        self.keep_best, self.keep_weights = keep_best, keep_weights
        self.pending: dict[str, dict] = {}  # trial id -> last result: ended, artifacts logged, not yet cleaned
        self.results: dict[str, dict] = {}  # trial id -> last result of every trial seen to end this session
        self.cleaned: set[str] = set()
        # trial id -> its place in Tune's trial list, the order of the sweep's rows (ties go to the earlier)
        self.order: dict[str, int] = {}
        self.weights_kept: dict[str, Path] = {}  # trial id -> <trial folder>/inverter.pt kept this session
        self._seen: tuple | None = None  # (name, mtime, size) of the state file last read
        self._last_poll = float("-inf")

    def trial_ended(self, trial_id: str, result: dict) -> None:
        """A trial ended (finished, pruned, collapsed, NaN) and its artifacts are in MLflow."""
        self.results[trial_id] = dict(result)
        if trial_id not in self.cleaned:
            self.pending[trial_id] = self.results[trial_id]

    def _key(self, trial_id: str) -> tuple:
        """`best_trials`' order: budget, metric, then Tune's trial order (the sweep's rows follow it)."""
        return (*rank_key(self.results[trial_id], self.metric, self.mode), self.order.get(trial_id, float("inf")))

    def may_be_best(self, trial_id: str) -> bool:
        """Whether the trial may end up among the `keep_best` best of its variant: fewer than that
        many of the trials ended so far rank strictly above it (ties kept), so every trial the final
        ranking picks (among more trials) kept its weights."""
        if self.keep_weights != "best" or self.keep_best < 1:
            return False
        if not qualifies(False, self.results.get(trial_id, {}), self.metric):
            return False
        # strictly better by budget and metric: a trial tied with others keeps its weights until the end,
        # since which of the tied ones the final ranking picks depends on an order not known yet
        key = self._key(trial_id)[:-1]
        better = sum(1 for other, m in self.results.items()
                     if other != trial_id and qualifies(False, m, self.metric) and self._key(other)[:-1] < key)
        return better < self.keep_best

    def set_order(self, trial_ids: Iterable[str | None]) -> None:
        """Tune's trial list, in its order (a callback's `trials`, or the run's results)."""
        self.order = {trial_id: i for i, trial_id in enumerate(trial_ids) if trial_id is not None}

    def poll(self, force: bool = False, trials: Iterable | None = None) -> int:
        """Clean every pending trial that the saved experiment state records as ended. Cheap when
        nothing is pending or the file has not changed; `force` after the run (the final state is
        written). `trials`: Tune's trial list, whose order breaks ties between equally good trials.
        Returns how many trials were cleaned."""
        now = time.monotonic()
        if not self.pending or (not force and now - self._last_poll < self.POLL_SECONDS):
            return 0
        self._last_poll = now
        if trials is not None:
            self.set_order(getattr(t, "trial_id", None) for t in trials)
        path = newest_state_file(self.exp_path)
        if path is None:
            return 0
        try:
            stat = path.stat()
        except OSError:
            return 0
        seen = (path.name, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen and not force:
            return 0
        records = {r.trial_id: r for r in read_experiment_state(self.exp_path).values()}
        if not records:
            return 0  # being written: try again
        self._seen = seen
        cleaned = 0
        for trial_id in list(self.pending):
            record = records.get(trial_id)
            if record is None or record.status != ENDED:
                continue
            trial_dir = self.exp_path / record.dir_name
            if self.clean(trial_dir, record, self.may_be_best(trial_id)):
                self.weights_kept[trial_id] = trial_dir / WEIGHTS
            del self.pending[trial_id]
            self.cleaned.add(trial_id)
            cleaned += 1
        for trial_id, path in list(self.weights_kept.items()):  # outranked since: it cannot be among the best
            if not self.may_be_best(trial_id):
                path.unlink(missing_ok=True)
                del self.weights_kept[trial_id]
        return cleaned

    @staticmethod
    def clean(trial_dir: Path, record: TrialRecord | None, keep_weights: bool) -> bool:
        """Remove the trial's checkpoints; with `keep_weights`, its last checkpoint's weights stay
        as `<trial folder>/inverter.pt`. Returns whether they did."""
        kept = False
        if keep_weights:
            last = latest_checkpoint(trial_dir, record)
            if last is not None and (last / WEIGHTS).is_file():
                kept = _link(last / WEIGHTS, trial_dir / WEIGHTS)
        for folder in sorted(trial_dir.glob(CHECKPOINT_GLOB)):
            if folder.is_dir():
                remove_checkpoint(folder)
        return kept

    def weights_of(self, trial_id: str) -> Path | None:
        """Where the trial's weights are now: kept beside its folder, or in its last checkpoint."""
        for name, record in read_experiment_state(self.exp_path).items():
            if record.trial_id == trial_id:
                trial_dir = self.exp_path / name
                if (trial_dir / WEIGHTS).is_file():
                    return trial_dir / WEIGHTS
                last = latest_checkpoint(trial_dir, record)
                return last / WEIGHTS if last is not None and (last / WEIGHTS).is_file() else None
        return None

    def settle(self, best: list[tuple[str, str | None]], log_weights: Callable[[str, Path], bool],
               ended: Iterable[str]) -> int:
        """Once the variant's run is complete: the weights of the `best` trials ((trial id, MLflow
        run id), best first) go to their runs through `log_weights`; every kept weights file is
        dropped, and `prune_checkpoints(ended)` removes what the run left (trials that ended in an
        earlier, killed session; older checkpoints of errored ones). A trial whose weights could not
        be logged keeps them on disk. Returns how many checkpoints were removed."""
        kept: set[str] = set()
        if self.keep_weights == "best":
            for trial_id, run_id in best[:self.keep_best]:
                path = self.weights_of(trial_id)
                if path is None or run_id is None:
                    log.warning("no weights to keep for trial %s", trial_id)
                elif not log_weights(run_id, path):
                    kept.add(trial_id)
        for name, record in read_experiment_state(self.exp_path).items():
            if record.trial_id not in kept:
                (self.exp_path / name / WEIGHTS).unlink(missing_ok=True)
        return prune_checkpoints(self.exp_path, set(ended) - kept)

