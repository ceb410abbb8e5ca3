"""The Optuna study of each tuned variant, written to DIR/optuna.db as each trial finishes.

Ray Tune's `OptunaSearch` keeps its study in memory and tells it every trial as COMPLETE, also
the trials that ASHA or the stopper ended early. The sweep driver therefore mirrors each finished
trial into a study of its own (SQLite, one study per variant, named `<sweep>/<variant>`), with the
state the trial really reached:

  COMPLETE  the trial ran its whole epoch budget; its value is its final metric
  PRUNED    ASHA, the collapse stopper, a NaN/inf loss or its time budget ended it early; its intermediate values
            (epoch -> metric, the evaluations the scheduler saw) are kept
  FAIL      the trial raised more often than `max_failures` allowed

Each Optuna trial names its MLflow run, Ray trial, variant and phase in its user attributes; the
MLflow run names the study and trial number in its tags. A trial is written once: a resumed sweep
that sees a trial end again (after a killed driver) finds it by its Ray trial id. Parameter
importance is computed on COMPLETE trials only: a pruned trial's value comes from a shorter budget.
"""
from __future__ import annotations

import datetime
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

ATTR_RUN = "mlflow_run_id"
ATTR_RAY_TRIAL = "ray_trial_id"
ATTR_VARIANT = "variant"
ATTR_PHASE = "phase"
ATTR_OUTCOME = "outcome"
ATTR_STOP_REASON = "stop_reason"

# how a trial ended (also the MLflow tag `harness.outcome`) -> its Optuna state
OUTCOME_STATES = {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "collapsed": TrialState.PRUNED,
                  "nonfinite": TrialState.PRUNED, "timed_out": TrialState.PRUNED, "failed": TrialState.FAIL}


def storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'optuna.db').resolve()}"


def search_distributions(search: dict) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every parameter `DefineByRunSpace` can suggest (a weight with
    `allow_off` adds the categorical `<key>.on`)."""
    out: dict[str, BaseDistribution] = {}
    for key, d in search.items():
        if d.allow_off:
            out[f"{key}.on"] = CategoricalDistribution([True, False])
        if d.dist == "choice":
            out[key] = CategoricalDistribution(d.values)
        elif d.dist == "int":
            out[key] = IntDistribution(int(d.low), int(d.high))
        else:
            out[key] = FloatDistribution(d.low, d.high, log=d.dist == "loguniform")
    return out


def trial_params(search: dict, config: dict) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
    """The Optuna parameters of a Tune trial's config: the `.on` draw, and the value only when
    the term is on (an off term was never suggested)."""
    dists = search_distributions(search)
    params, used = {}, {}
    for key, d in search.items():
        if d.allow_off:
            params[f"{key}.on"], used[f"{key}.on"] = bool(config.get(f"{key}.on", True)), dists[f"{key}.on"]
            if not params[f"{key}.on"]:
                continue
        if key in config:
            params[key], used[key] = config[key], dists[key]
    return params, used


class StudyRecorder:
    """Writes finished Tune trials into one persistent Optuna study (see the module docstring).
    Picklable: Tune saves its callbacks with the experiment; the storage is reopened lazily."""

    def __init__(self, url: str, study_name: str, directions: list[str], metric_names: list[str],
                 search: dict, study_attrs: dict[str, str] | None = None):
        self.url, self.study_name, self.directions = url, study_name, directions
        self.metric_names, self.search, self.study_attrs = metric_names, search, study_attrs or {}
        self._study: optuna.Study | None = None
        self._written: dict[str, tuple[int, TrialState]] = {}  # Ray trial id -> (number, state)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_study"], state["_written"] = None, {}
        return state

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = optuna.create_study(storage=self.url, study_name=self.study_name,
                                              directions=self.directions, load_if_exists=True)
            if len(self.metric_names) == len(self.directions):
                with warnings.catch_warnings():  # experimental since Optuna 3.2, still there in 5.0
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self._study.set_metric_names(self.metric_names)
            for key, value in self.study_attrs.items():
                self._study.set_user_attr(key, value)
            for t in self._study.get_trials(deepcopy=False):
                if ATTR_RAY_TRIAL in t.user_attrs:
                    self._written[t.user_attrs[ATTR_RAY_TRIAL]] = (t.number, t.state)
        return self._study

    def record(self, ray_trial_id: str, config: dict, outcome: str, values: list[float] | None,
               intermediate: dict[int, float], user_attrs: dict[str, Any],
               started: datetime.datetime | None = None) -> int:
        """Add the trial (committed at once) and return its number. A trial already written keeps
        its record, except a FAIL that a resumed sweep ran to an end: that attempt is added too."""
        study = self.study
        state = OUTCOME_STATES[outcome]
        if ray_trial_id in self._written:
            number, old_state = self._written[ray_trial_id]
            if old_state != TrialState.FAIL or state == TrialState.FAIL:
                return number
            user_attrs = {**user_attrs, "after_failed_attempt": number}
        if state == TrialState.COMPLETE and (values is None or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            state, outcome = TrialState.FAIL, "failed"  # a full-length trial without a value to rank
        params, distributions = trial_params(self.search, config)
        now = datetime.datetime.now()
        trial = optuna.trial.FrozenTrial(
            number=-1, trial_id=-1, state=state, value=None,
            values=[float(v) for v in values] if state == TrialState.COMPLETE else None,
            datetime_start=min(started or now, now), datetime_complete=now, params=params,
            distributions=distributions, user_attrs={**user_attrs, ATTR_RAY_TRIAL: ray_trial_id, ATTR_OUTCOME: outcome},
            system_attrs={}, intermediate_values={int(k): float(v) for k, v in intermediate.items()})
        study.add_trial(trial)  # validates params against their distributions, then commits
        number = study.get_trials(deepcopy=False)[-1].number
        self._written[ray_trial_id] = (number, state)
        return number


def complete_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
