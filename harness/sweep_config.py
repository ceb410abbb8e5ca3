"""Sweep files (search_spaces/*.yaml): what varies, what is searched, and how it is scheduled.

A sweep = one or more *variants* (the cartesian product of `axes`, each a dotted trial setting
with a list of values) x an Optuna search over `search` (dotted settings with distributions),
each variant with the same budget. Every variant's base config is validated with the trial's
own typed model, as is a point at each end of every searched range, before Ray starts.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from harness.config import (ConfigError, TrialConfig, _Section, build_config, deep_merge, flatten,
                            load_yaml, parse_overrides, unflatten)


class Distribution(_Section):
    """One searched setting. `off_prob` > 0 makes 0 ("term off") a choice of its own."""
    dist: Literal["uniform", "loguniform", "int", "choice"] = Field(description="distribution")
    low: float | None = Field(None, description="lower bound (uniform, loguniform, int)")
    high: float | None = Field(None, description="upper bound (uniform, loguniform, int)")
    values: list[Any] | None = Field(None, description="choices (choice)")
    allow_off: bool = Field(False, description="also try 0 (the term off) as a separate choice")

    @model_validator(mode="after")
    def _bounds(self):
        if self.dist == "choice":
            if not self.values:
                raise ValueError("values: a choice needs a non-empty list of values")
        else:
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError("low/high: give low < high")
            if self.dist == "loguniform" and self.low <= 0:
                raise ValueError("low: loguniform needs low > 0 (use allow_off: true to include 0)")
        return self

    def extremes(self) -> list[Any]:
        points = list(self.values) if self.dist == "choice" else [self.low, self.high]
        if self.dist == "int":
            points = [int(p) for p in points]
        return points + ([0] if self.allow_off else [])


class AshaConfig(_Section):
    enabled: bool = Field(True, description="prune with ASHA on the sweep metric")
    grace_period: int = Field(2, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA's reduction factor")


class BudgetConfig(_Section):
    num_samples: int = Field(8, ge=1, description="trials per variant")
    epochs: int | None = Field(None, ge=1, description="generator epochs per trial (default: base train.epochs)")
    steps_per_epoch: int | None = Field(None, ge=1, description="override base train.steps_per_epoch")


class ResourcesConfig(_Section):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (also its torch threads, at least 1)")
    gpu: float | Literal["auto"] = Field(
        "auto", description="GPUs per trial: a fraction shares a GPU; auto = gpu_fraction if the "
        "cluster has GPUs, else 0")
    gpu_fraction: float = Field(0.25, gt=0, le=1, description="GPU share per trial when gpu is auto")
    max_concurrent: int | None = Field(None, ge=1, description="concurrent trials (default: what fits)")


class StopConfig(_Section):
    collapse_patience: int = Field(3, ge=1, description="stop a trial collapsed at this many evaluations in a row")
    collapse_min_epoch: int = Field(2, ge=1, description="... but not before this epoch")


class ClaimConfig(_Section):
    """The study's claim, as a test: `greater` beats `lesser` on `metric` (confidence intervals
    over seeds separate), or `greater` lies above the `reference` metric's value."""
    statement: str = Field(description="the claim in words")
    metric: str = Field("ssim_nn_train_mean", description="metric that decides it (higher = more leakage)")
    greater: str = Field(description="variant expected to be higher, e.g. pool=avg")
    lesser: str | None = Field(None, description="variant expected to be lower, e.g. pool=max")
    reference: str | None = Field(None, description="or: reference metric to beat, e.g. ref_blank_ssim")

    @model_validator(mode="after")
    def _one_comparison(self):
        if (self.lesser is None) == (self.reference is None):
            raise ValueError("give exactly one of lesser (a variant) or reference (a ref_* metric)")
        return self


class SweepConfig(_Section):
    name: str = Field(description="sweep name: MLflow experiment, output folder, Optuna study prefix")
    description: str = Field("", description="what this sweep is for")
    base: dict[str, Any] = Field(default_factory=dict, description="trial settings shared by every trial")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="dotted setting -> values; one variant each")
    search: dict[str, Distribution] = Field(default_factory=dict, description="dotted setting -> distribution")
    metric: str = Field("score", description="metric ASHA and the searcher optimise")
    mode: Literal["max", "min"] = Field("max", description="max or min")
    objectives: dict[str, Literal["max", "min"]] | None = Field(
        None, description="multi-objective search (e.g. {ssim_nn_train_mean: max, diversity: max}); "
        "ASHA still prunes on `metric`")
    seed: int = Field(0, description="seed of the TPE sampler")
    tpe_startup_trials: int = Field(10, ge=1, description="random trials before TPE models the space")
    asha: AshaConfig = Field(default_factory=AshaConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    claim: ClaimConfig | None = Field(None, description="what the study tests (harness report)")
    checkpoint_every: int = Field(5, ge=1, description="checkpoint the generator every this many epochs")
    max_failures: int = Field(1, ge=0, description="retries of a failing trial, from its last checkpoint")

    @model_validator(mode="after")
    def _axes_nonempty(self):
        for key, values in self.axes.items():
            if not values:
                raise ValueError(f"axes.{key}: give at least one value")
        if self.claim:
            names = [name for name, _ in self.variants()]
            for side in (self.claim.greater, self.claim.lesser):
                if side is not None and side not in names:
                    raise ValueError(f"claim: {side!r} is not a variant; variants are {', '.join(names)}")
        return self

    # -- derived -----------------------------------------------------------------------------
    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(variant name, flat settings of the axes) for every combination of the axes."""
        if not self.axes:
            return [("all", {})]
        keys = list(self.axes)
        out = []
        for combo in itertools.product(*(self.axes[k] for k in keys)):
            settings = dict(zip(keys, combo))
            out.append(("__".join(f"{k.split('.')[-1]}={v}" for k, v in settings.items()), settings))
        return out

    def trial_base(self, variant_settings: dict[str, Any]) -> dict:
        """The full nested trial config of a variant, before the searched values."""
        budget = {}
        if self.budget.epochs:
            budget["train.epochs"] = self.budget.epochs
        if self.budget.steps_per_epoch:
            budget["train.steps_per_epoch"] = self.budget.steps_per_epoch
        return deep_merge(self.base, unflatten({**budget, **variant_settings}))

    def epochs(self, variant_settings: dict[str, Any]) -> int:
        return build_config(self.trial_base(variant_settings)).train.epochs


def load_sweep(path: str | Path, overrides: list[str] | None = None, smoke: bool = False) -> SweepConfig:
    """Read and validate a sweep file; every variant x searched extreme must be a valid trial."""
    data = deep_merge(load_yaml(path), parse_overrides(overrides))
    if smoke:
        data = deep_merge(data, {"budget": {"num_samples": 2, "epochs": 2, "steps_per_epoch": 3},
                                 "base": {"eval": {"per_class": 10}}})
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error_sweep(exc)) from None
    for variant, settings in sweep.variants():
        base = sweep.trial_base(settings)
        try:
            build_config(base)
        except ConfigError as exc:
            raise ConfigError(f"base/axes ({variant}): {exc}") from None
        for key, dist in sweep.search.items():
            if key not in flatten(TrialConfig().model_dump()):
                raise ConfigError(f"search.{key}: not a trial setting; see `harness config` for the names")
            for value in dist.extremes():
                try:
                    build_config(deep_merge(base, unflatten({key: value})))
                except ConfigError as exc:
                    raise ConfigError(f"search.{key}: value {value!r} is not valid ({exc})") from None
    return sweep


def _format_error_sweep(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key in the sweep file"
    if first["type"] == "missing":
        return f"{loc}: required"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


