"""Sweep files (search_spaces/*.yaml): what varies, what is searched, and how it is scheduled.

A sweep = one or more *variants* (the cartesian product of `axes`, each a dotted trial setting
with a list of values) x an Optuna search over `search` (dotted settings with distributions),
each variant with the same budget. Every variant's base config is validated with the trial's
own typed model, as is a point at each end of every searched range, before Ray starts.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.config import (MAX_NAME, NUMBER_ERRORS, ConfigError, TrialConfig, _Section, build_config, check_data_root,
                            control_character, deep_merge, flatten, load_yaml, parse_overrides, parse_yaml, seed_field,
                            short_repr, unflatten)
from harness.records.metric_names import METRIC_NAMES, REFERENCE_NAMES

_NONE = object()
TARGET_NAMES = (*METRIC_NAMES, *REFERENCE_NAMES)  # what a sweep may optimise or a claim compare
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# a variant's confirmation and control runs are stored as <phase>-<variant>: no variant may look like one
PHASE_PREFIXES = ("confirm-", "control-")
CONFIRM_SEED_START = 1000  # confirmation seeds start here, or after the largest tuning seed
OFF_SUFFIX = ".on"  # `<key>.on`: the searched flag of a weight with allow_off (False = weight 0)


def trial_settings() -> set[str]:
    """Every dotted trial setting a sweep may set, search or vary (`harness config` lists them)."""
    return set(flatten(TrialConfig().model_dump()))


def _check_target(name: str) -> str:
    if name not in TARGET_NAMES:
        raise ValueError(f"{name!r} is not a metric; use one of: {', '.join(TARGET_NAMES)}")
    return name


class Distribution(_Section):
    """One searched setting. `allow_off: true` makes 0 ("term off") a choice of its own."""
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
            if self.low is None or self.high is None:
                raise ValueError(f"low/high: a {self.dist} distribution needs both low and high")
            if not (math.isfinite(self.low) and math.isfinite(self.high)):
                raise ValueError(f"low/high: give finite bounds (got {self.low}, {self.high})")
            if self.low >= self.high:
                raise ValueError(f"low/high: give low < high (got {self.low} >= {self.high})")
            if self.dist == "loguniform" and self.low <= 0:
                raise ValueError(f"low: loguniform needs low > 0 (got {self.low}; use allow_off: true to include 0)")
            if self.dist == "int" and not (self.low.is_integer() and self.high.is_integer()):
                raise ValueError(f"low/high: an int distribution needs whole-number bounds (got {self.low}, {self.high})")
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

    @field_validator("gpu")
    @classmethod
    def _gpu_not_negative(cls, value):
        if value != "auto" and value < 0:
            raise ValueError(f"give auto or a GPU count >= 0 (got {value})")
        return value


class StopConfig(_Section):
    collapse_patience: int = Field(3, ge=1, description="stop a trial collapsed at this many evaluations in a row")
    collapse_min_epoch: int = Field(2, ge=1, description="... but not before this epoch")


class ClaimConfig(_Section):
    """The study's claim, as a test: `greater` beats `lesser` on `metric` (the 95% interval of the
    difference, paired by seed, lies above 0), or with a `margin` the two do not differ by more
    than it (TOST), or `greater` lies above the `reference` metric's value, or above the value
    `above` (the same rule on greater − above, seed by seed)."""
    statement: str = Field(description="the claim in words")
    metric: str = Field("ssim_nn_train_mean", description="metric that decides it (higher = more leakage)")
    greater: str = Field(description="variant expected to be higher, e.g. pool=avg")
    lesser: str | None = Field(None, description="variant expected to be lower, e.g. pool=max")
    reference: str | None = Field(None, description="or: reference metric to beat, e.g. ref_blank_ssim")
    above: float | None = Field(None, allow_inf_nan=False, description="or: a value that greater's metric lies above, "
                                "decided by the paired rule on (value − above) per seed, e.g. 0 for coverage_gap: "
                                "the training images come back more often than as many held-out ones")
    margin: float | None = Field(None, gt=0, allow_inf_nan=False, description="a claim of no difference: "
                                 "|greater - lesser| < margin on metric, tested by two one-sided tests (TOST); "
                                 "written down before the runs, e.g. 0.05")

    @field_validator("metric")
    @classmethod
    def _metric_known(cls, value: str) -> str:
        return _check_target(value)

    @field_validator("reference")
    @classmethod
    def _reference_known(cls, value: str | None) -> str | None:
        if value is not None and value not in REFERENCE_NAMES:
            raise ValueError(f"{value!r} is not a reference point; use one of: {', '.join(REFERENCE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _one_comparison(self):
        from harness.report.verdicts import COUNTED

        if sum(side is not None for side in (self.lesser, self.reference, self.above)) != 1:
            raise ValueError("give exactly one of lesser (a variant), reference (a ref_* metric) or above (a value)")
        if self.above is not None and self.metric in COUNTED:
            raise ValueError(f"above: {self.metric} is a count, decided by Fisher's exact test between two variants; "
                             "give lesser")
        if self.margin is not None:
            if self.lesser is None:
                raise ValueError("margin: a claim of no difference compares two variants; give lesser, not reference or above")
            if self.metric in COUNTED:
                raise ValueError(f"margin: {self.metric} is a count, decided by Fisher's exact test; a margin "
                                 "applies to a metric averaged over seeds")
        return self


class SweepConfig(_Section):
    model_config = ConfigDict(populate_by_name=True)  # `variants` in a file, named_variants in code
    name: str = Field(description="sweep name: MLflow experiment, output folder, Optuna study prefix")
    description: str = Field("", description="what this sweep is for")
    base: dict[str, Any] = Field(default_factory=dict, description="trial settings shared by every trial")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="dotted setting -> values; one variant each")
    named_variants: dict[str, dict[str, Any] | None] | None = Field(
        None, alias="variants", description="instead of axes: variant name -> its dotted settings over the base "
        "(e.g. {full: {}, no_kkt: {loss.kkt: 0}}): variants that are not a product of axes, such as a "
        "leave-one-out ablation")
    search: dict[str, Distribution] = Field(default_factory=dict, description="dotted setting -> distribution")
    metric: str = Field("score", description="metric ASHA and the searcher optimise")
    mode: Literal["max", "min"] = Field("max", description="max or min")
    objectives: dict[str, Literal["max", "min"]] | None = Field(
        None, description="multi-objective search (e.g. {ssim_nn_train_mean: max, diversity: max}); "
        "ASHA still prunes on `metric`")
    seed: int = seed_field(0, "seed of the TPE sampler")
    tpe_startup_trials: int = Field(10, ge=1, description="random trials before TPE models the space")
    asha: AshaConfig = Field(default_factory=AshaConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    claim: ClaimConfig | None = Field(None, description="what the study tests (harness report)")
    control: dict[str, Any] | None = Field(
        None, description="harness ablate: a class-level control, trial settings (nested like base, e.g. "
        "{inverter: direct, ...}) that replace the base's for one untuned run per variant and confirmation "
        "seed (phase control): the same classifier inverted another way, so a report can tell a difference "
        "of the classifiers from one of the generator")
    confirm_seeds: int = Field(3, ge=1, description="harness ablate: confirmation seeds per variant (--seeds "
                               "overrides it); a claim on a count (collapsed) needs at least 4")
    classifier_confound: bool = Field(
        False, description="harness ablate: allow `search` to tune a setting that decides the classifier "
        "(classifier.*, data.*) per variant. Off, such a study is refused: the variants' classifiers would "
        "differ in a setting the claim does not name. On, the report states it as a confound in its Verdict")
    confirm_subset: bool = Field(
        True, description="harness ablate: a confirmation seed also draws the training subset (data.subset_seed, "
        "and so the disjoint subset of a negative control), not only the classifier's and the inverter's "
        "initialisation; every variant at seed s sees the same images (paired). false: one subset for all seeds")
    checkpoint_every: int = Field(5, ge=1, description="checkpoint the generator every this many epochs")
    max_failures: int = Field(1, ge=0, description="retries of a failing trial, from its last checkpoint")
    keep_best: int = Field(1, ge=0, description="the inverter's weights of this many best trials of each variant "
                           "(the summary's ranking by `metric`) are kept, as inverter.pt in their MLflow runs, once "
                           "the variant's run is complete; a trial's checkpoints are removed as soon as it has "
                           "ended and its artifacts are in MLflow. 0: no weights")
    keep_weights: Literal["best", "all"] = Field(
        "best", description="best: the weights of the keep_best best trials only; all: every trial's weights "
        "(inverter.pt in its MLflow run, as it ends)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not PLAIN_NAME.fullmatch(value):
            raise ValueError(f"{short_repr(value)} is not a plain name; use letters, digits, _ and - only (it "
                             "names the output folder, the MLflow experiment and the Optuna studies)")
        if len(value) > MAX_NAME:
            raise ValueError(f"{len(value)} characters long; keep it to {MAX_NAME} (it names folders)")
        return value

    @field_validator("metric")
    @classmethod
    def _metric_known(cls, value: str) -> str:
        return _check_target(value)

    @field_validator("objectives")
    @classmethod
    def _objectives_known(cls, value: dict | None) -> dict | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one metric, or leave objectives out")
            for name in value:
                _check_target(name)
        return value

    @model_validator(mode="before")
    @classmethod
    def _metric_defaults_to_first_objective(cls, data):
        """Left out in a multi-objective search, `metric` is the first objective and `mode` its
        direction (filled in before validation, so the model is validated once)."""
        if isinstance(data, dict) and isinstance(data.get("objectives"), dict) and data["objectives"]:
            first = next(iter(data["objectives"]))
            try:
                _check_target(first)
            except (ValueError, TypeError):
                return data  # the objectives' own check names it
            data = dict(data)
            metric = data.setdefault("metric", first)
            if "mode" not in data and data["objectives"].get(metric) in ("max", "min"):
                data["mode"] = data["objectives"][metric]
        return data

    @model_validator(mode="after")
    def _metric_among_objectives(self):
        """ASHA prunes on `metric`: in a multi-objective search it must be one of the objectives, in
        the same direction."""
        if not self.objectives:
            return self
        if self.metric not in self.objectives:
            raise ValueError(f"metric {self.metric!r} is not one of the objectives ({', '.join(self.objectives)}); "
                             "ASHA would prune on a metric the search does not optimise: name one of them "
                             "or leave metric out (then the first objective)")
        if self.mode != self.objectives[self.metric]:
            raise ValueError(f"mode {self.mode!r} contradicts objectives.{self.metric}: "
                             f"{self.objectives[self.metric]!r}; give one direction (or leave mode out)")
        return self

    @model_validator(mode="after")
    def _base_axes_claim(self):
        """In this order, so the first error is the cause: the base is a valid trial, every axis
        is a setting with valid values giving distinct variant names, the claim names variants."""
        try:
            build_config(self.trial_base({}))
        except ConfigError as exc:
            raise ValueError(f"base: {exc}") from None
        settings = trial_settings()
        if self.named_variants is not None:
            self._check_named_variants(settings)
        for key, values in self.axes.items():
            if key not in settings:
                raise ValueError(f"axes.{key}: not a trial setting; see `harness config` for the names")
            if not values:
                raise ValueError(f"axes.{key}: give at least one value")
            as_set: list[tuple[Any, Any]] = []  # (value as written, value as the trial takes it)
            for value in values:
                text = str(value)
                if "/" in text or "\\" in text:
                    raise ValueError(f"axes.{key}: value {short_repr(value)} holds a path separator; a variant "
                                     "name names folders, so vary a plain value")
                if control_character(text) is not None:
                    raise ValueError(f"axes.{key}: value {short_repr(value)} holds a control character "
                                     f"({control_character(text)!r}); a variant name names folders, so use "
                                     "printable text")
                if len(text) > MAX_NAME:
                    raise ValueError(f"axes.{key}: a value {len(text)} characters long; keep values to "
                                     f"{MAX_NAME} (they name folders)")
                try:
                    taken = flatten(build_config(self.trial_base({key: value})).model_dump())[key]
                except ConfigError as exc:
                    raise ValueError(f"axes.{key}: value {short_repr(value)} is not valid ({exc})") from None
                same = next((written for written, other in as_set if other == taken), _NONE)
                if same is not _NONE:
                    raise ValueError(f"axes.{key}: values {short_repr(same)} and {short_repr(value)} are the same "
                                     f"setting ({short_repr(taken)}); list each value once")
                as_set.append((value, taken))
        names = [name for name, _ in self.variants()]
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"axes: the values give the variant {short_repr(twice[0])} twice; list each value once")
        long_name = next((n for n in names if len(n) > MAX_NAME), None)
        if long_name is not None:
            raise ValueError(f"axes: the variant name {short_repr(long_name, 40)} is {len(long_name)} characters "
                             f"long; keep it to {MAX_NAME} (it names folders): shorter values or fewer axes")
        if self.control is not None:
            if not self.control:
                raise ValueError("control: give the control's trial settings (e.g. {inverter: direct}) or leave it out")
            for name, settings in self.variants():
                try:
                    build_config(self.control_base(settings))
                except ConfigError as exc:
                    raise ValueError(f"control: not a valid trial for variant {name} ({exc})") from None
        if self.claim:
            for field, side in (("greater", self.claim.greater), ("lesser", self.claim.lesser)):
                if side is not None and side not in names:
                    raise ValueError(f"claim.{field}: {side!r} is not a variant; variants are {', '.join(names)}")
            if self.claim.lesser == self.claim.greater:
                raise ValueError(f"claim.lesser: {self.claim.lesser!r} is also claim.greater; compare two "
                                 "different variants")
        return self

    def _check_named_variants(self, settings: set[str]) -> None:
        if self.axes:
            raise ValueError("variants: give axes or variants, not both")
        if not self.named_variants:
            raise ValueError("variants: give at least one variant (name: {dotted.setting: value}), or leave it out")
        seen: list[tuple[str, dict]] = []
        for name, changes in self.named_variants.items():
            if not PLAIN_NAME.fullmatch(str(name)) or len(str(name)) > MAX_NAME:
                raise ValueError(f"variants: {short_repr(name)} is not a plain name of at most {MAX_NAME} characters; "
                                 "use letters, digits, _ and - (it names folders)")
            if str(name).startswith(PHASE_PREFIXES):
                raise ValueError(f"variants: {short_repr(name)} starts like the folder of another phase "
                                 f"({', '.join(PHASE_PREFIXES)}); rename it")
            for key in changes or {}:
                if key not in settings:
                    raise ValueError(f"variants.{name}.{key}: not a trial setting; see `harness config` for the names")
            try:
                taken = flatten(build_config(self.trial_base(changes or {})).model_dump())
            except ConfigError as exc:
                raise ValueError(f"variants.{name}: not a valid trial ({exc})") from None
            same = next((other for other, trial in seen if trial == taken), None)
            if same is not None:
                raise ValueError(f"variants.{name}: the same trial settings as variants.{same}; make each variant differ")
            seen.append((name, taken))

    # -- derived -----------------------------------------------------------------------------
    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(variant name, flat settings of the axes) for every combination of the axes. A name
        joins `<key>=<value>` with `__`, each key shortened to its last dotted part, or to as
        many trailing parts as tell it apart from the other axes (`pool=avg`, but
        `classifier.dropout=0.1__generator.dropout=0.5`). With `variants` (named), those names and
        settings, in the file's order."""
        if self.named_variants is not None:
            return [(name, dict(changes or {})) for name, changes in self.named_variants.items()]
        if not self.axes:
            return [("all", {})]
        keys = list(self.axes)
        short = short_keys(keys)
        out = []
        for combo in itertools.product(*(self.axes[k] for k in keys)):
            settings = dict(zip(keys, combo))
            out.append(("__".join(f"{short[k]}={v}" for k, v in settings.items()), settings))
        return out

    def largest_tuning_seed(self) -> int:
        """The largest seed (generator `seed` or `classifier.seed`) a tuning trial can run with:
        the base's, an axis value, the top of a searched range, or, without a search, the last of
        the `num_samples` consecutive seeds a sweep then runs."""
        seeds = []
        for _, settings in self.variants():
            cfg = build_config(self.trial_base(settings))
            seeds += [cfg.classifier.seed, cfg.seed + (self.budget.num_samples - 1 if not self.search else 0)]
            if self.confirm_subset:  # confirmation seeds also draw subsets: none may be a tuning trial's
                seeds.append(cfg.data.subset_seed)
        for key in ("seed", "classifier.seed"):
            dist = self.search.get(key)
            if dist is not None:
                seeds += [int(v) for v in dist.extremes() if isinstance(v, (int, float))]
        return max(seeds)

    def confirmation_seeds(self, n: int) -> list[int]:
        """`n` seeds for the confirmation runs, disjoint from every tuning seed: they start at
        1000, or after the largest tuning seed if that is higher. Reusing a tuning seed would rerun
        the selected winner itself (a winner's-curse bias)."""
        start = max(CONFIRM_SEED_START, self.largest_tuning_seed() + 1)
        return list(range(start, start + n))

    def trial_base(self, variant_settings: dict[str, Any]) -> dict:
        """The full nested trial config of a variant, before the searched values."""
        budget = {}
        if self.budget.epochs:
            budget["train.epochs"] = self.budget.epochs
        if self.budget.steps_per_epoch:
            budget["train.steps_per_epoch"] = self.budget.steps_per_epoch
        return deep_merge(self.base, unflatten({**budget, **variant_settings}))

    def control_base(self, variant_settings: dict[str, Any]) -> dict:
        """The control trial of a variant: the base with `control` merged over it (the budget's
        epochs and steps do not apply: the control states its own), then the variant's axes."""
        return self.control_sweep().trial_base(variant_settings)

    def control_sweep(self) -> "SweepConfig":
        """This study as the control phase runs it: the control's settings as the base, no
        search, no pruning, no collapse stop, no control of its own."""
        return self.model_copy(update={"base": deep_merge(self.base, self.control or {}), "search": {},
                                       "budget": BudgetConfig(num_samples=1), "asha": AshaConfig(enabled=False),
                                       "stop": StopConfig(collapse_patience=10 ** 6), "control": None})

    def epochs(self, variant_settings: dict[str, Any]) -> int:
        return build_config(self.trial_base(variant_settings)).train.epochs


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest trailing part that no other key ends with (the full key when
    none is: `seed` beside `classifier.seed`)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        out[key] = key
        for k in range(1, len(parts)):
            tail = ".".join(parts[-k:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                out[key] = tail
                break
    return out


def clean_searched(config: dict) -> dict:
    """A trial's searched settings as the trial sees them: `<key>.on` flags folded into 0."""
    out = {k: v for k, v in config.items() if not k.endswith(OFF_SUFFIX)}
    out.update({k[:-len(OFF_SUFFIX)]: 0.0 for k, v in config.items() if k.endswith(OFF_SUFFIX) and v is False})
    return out


def settings_of(config: dict, fixed: dict[int, dict] | None = None) -> dict:
    """The dotted settings a trial runs with: its entry of a fixed list (`__fixed__` = index),
    or its searched values."""
    if "__fixed__" in config:
        return dict((fixed or {})[config["__fixed__"]])
    return clean_searched(config)


def resolve_trial(base: dict, settings: dict) -> TrialConfig:
    """The full trial configuration: the variant's base with the trial's dotted settings on top."""
    return build_config(deep_merge(base, unflatten(settings)))


# settings that fix how much a trial trains: searching them would rank trials of unequal budgets
BUDGET_SETTINGS = ("train.epochs", "train.steps_per_epoch", "train.max_seconds")


def sweep_overrides(raw: dict, pairs: list[str] | None) -> dict:
    """The sweep file `raw` with its `--set` pairs applied. Dotted keys nest (`--set base.loss.kkt=1`,
    `--set budget.num_samples=8`), except where the key goes on with a setting's name, which has dots
    of its own: `--set 'axes.data.train_size=[20, 50]'` replaces that axis, `--set 'search.loss.tv={dist:
    uniform, low: 0, high: 0.5}'` that whole searched entry (nothing of the file's entry is kept), and
    `--set variants.no_kkt.loss.kkt=0` one setting of the named variant `no_kkt`. The last pair wins."""
    nested, whole = [], []
    for pair in pairs or []:
        key, eq, text = pair.partition("=")
        key = key.strip()
        section, _, rest = key.partition(".")
        name, target = rest, None
        if section == "variants":
            target, _, name = rest.partition(".")
        if section in ("axes", "search", "variants") and name and eq:
            value = parse_yaml(text, f"--set {key}") if text != "" else ""
            whole.append((section, target, name, value))
        else:
            nested.append(pair)
    data = deep_merge(raw, parse_overrides(nested))
    for section, target, name, value in whole:
        node = data.get(section)
        if node is not None and not isinstance(node, dict):
            raise ConfigError(f"--set {section}.{name}: {section} is not a section")
        data[section] = node = dict(node or {})  # a copy: the file's own mapping stays as read
        if target is not None:
            if target not in node:  # a misspelt variant (nobn for no_bn) would be a new one, silently
                if not node:
                    raise ConfigError(f"--set variants.{target}.{name}: the sweep file has no named variants "
                                      f"(no variants: section); set base.{name}, or add the variant to the file")
                raise ConfigError(f"--set variants.{target}.{name}: {short_repr(target)} is not a variant of the "
                                  f"sweep file; its variants are {', '.join(map(str, node))}")
            if node.get(target) is not None and not isinstance(node[target], dict):
                raise ConfigError(f"--set variants.{target}.{name}: variant {target} is not a mapping of settings")
            node[target] = node = dict(node.get(target) or {})
        node[name] = value
    return data


def load_sweep(path: str | Path, overrides: list[str] | None = None, smoke: bool = False) -> SweepConfig:
    """Read and validate a sweep file before anything runs: every key is known, every searched
    key is a setting, every variant and each end of every searched range is a valid trial, and
    ASHA's grace period fits every variant's epochs. Errors raise ConfigError naming the field."""
    raw = load_yaml(path)
    if not raw:
        raise ConfigError(f"config: {path} is empty; a sweep file needs at least a name")
    data = sweep_overrides(raw, overrides)
    if smoke:
        data = deep_merge(data, {"budget": {"num_samples": 2, "epochs": 2, "steps_per_epoch": 3},
                                 "asha": {"grace_period": 1}, "base": {"eval": {"per_class": 10}}})
        if data.get("control"):  # the control states its own budget: shrink it too
            data = deep_merge(data, {"control": {"train": {"epochs": 2, "steps_per_epoch": 3, "eval_every": 2}}})
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error_sweep(exc)) from None
    settings_names = trial_settings()
    for key in sweep.search:
        if key not in settings_names:
            raise ConfigError(f"search.{key}: not a trial setting; see `harness config` for the names")
        if key in sweep.axes:
            raise ConfigError(f"search.{key}: also an axis; vary a setting or search it, not both")
        varied = next((name for name, changes in (sweep.named_variants or {}).items() if key in (changes or {})), None)
        if varied is not None:
            raise ConfigError(f"search.{key}: also set by variants.{varied}; vary a setting or search it, not both")
        if key in BUDGET_SETTINGS:
            raise ConfigError(f"search.{key}: sets the budget that ASHA's rungs and the best-trial rule compare "
                              "trials at; set it in base, or make it an axis to compare budgets")
        _check_drawable(key, sweep.search[key])
    for variant, settings in sweep.variants():
        base = sweep.trial_base(settings)
        try:
            trial = build_config(base)
        except ConfigError as exc:
            raise ConfigError(f"axes ({variant}): {exc}") from None
        epochs = trial.train.epochs
        timed = [trial] + ([build_config(sweep.control_base(settings))] if sweep.control else [])
        if "train.max_seconds" in sweep.search or any(t.train.max_seconds for t in timed):
            raise ConfigError("train.max_seconds: a time budget ends a trial before its epochs, which a sweep "
                              "would record as stopped early; give trials epochs (budget.epochs) instead")
        if sweep.asha.enabled and sweep.asha.grace_period > epochs:
            raise ConfigError(f"asha.grace_period: {sweep.asha.grace_period} is more than the {epochs} epochs of "
                              f"variant {variant}; lower it or raise budget.epochs")
        for key, dist in sweep.search.items():
            for value in dist.extremes():
                try:
                    build_config(deep_merge(base, unflatten({key: value})))
                except ConfigError as exc:
                    raise ConfigError(f"search.{key}: value {value!r} is not valid ({exc})") from None
    return sweep


def setting_types(key: str) -> set[type]:
    """The Python types a dotted trial setting takes (e.g. {int} for train.jitter, {int, NoneType}
    for loss.kkt_layers, {} for a choice of names)."""
    model: type[BaseModel] = TrialConfig
    *sections, last = key.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    annotation = model.model_fields[last].annotation
    return {a for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type)}


def _check_drawable(key: str, dist: Distribution) -> None:
    """Every value the distribution can draw is of the setting's type, not only its two ends: a
    uniform range on a whole-number setting would fail at the first draw of, say, 42.3."""
    types = setting_types(key)
    if dist.dist in ("uniform", "loguniform") and float not in types:
        fix = "use dist: int with whole-number low/high" if int in types else "use dist: choice"
        raise ConfigError(f"search.{key}: takes {'whole numbers' if int in types else 'no fractions'}, but a "
                          f"{dist.dist} distribution draws fractions (e.g. 42.3); {fix}")
    if dist.dist == "int" and not types & {int, float}:
        raise ConfigError(f"search.{key}: not a number setting, so dist: int does not fit; use dist: choice")


def check_local_machine(sweep: SweepConfig) -> None:
    """What a sweep run on this machine (no --address) needs from it, checked before Ray starts:
    the data folders its trials name exist, and one trial's CPUs and GPUs fit the machine (Ray
    would leave a trial that does not fit pending forever, or fail it inside a worker)."""
    trials = [sweep.trial_base(s) for _, s in sweep.variants()]
    trials += [sweep.control_base(s) for _, s in sweep.variants()] if sweep.control else []
    for trial in trials:
        check_data_root(build_config(trial).data)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    r = sweep.resources
    if r.cpu > cpus:
        raise ConfigError(f"resources.cpu: {r.cpu:g} per trial but this machine has {cpus} CPUs; lower it "
                          "(or run on a cluster with --address)")
    if r.gpu != "auto" and r.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if r.gpu > gpus:
            have = f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU"
            raise ConfigError(f"resources.gpu: {r.gpu:g} per trial but this machine has {have}; lower it, or "
                              "use gpu: auto (a share of a GPU when there is one, else none)")


def _format_error_sweep(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section = _sweep_section(first["loc"][:-1])
        allowed = f"; allowed here: {', '.join(section.model_fields)}" if section else ""
        return f"{loc}: unknown key in the sweep file{allowed}"
    if first["type"] == "missing":
        return f"{loc}: required"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("value_error", *NUMBER_ERRORS) and "input" in first:
        msg += f" (got {short_repr(first['input'])})"
    return f"{loc}: {msg}" if loc else msg


def _sweep_section(loc) -> type[BaseModel] | None:
    """The model of the sweep-file section at `loc` (for the list of allowed keys)."""
    model: type[BaseModel] = SweepConfig
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return None
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            if parts:
                parts.pop(0)  # the dict's key (e.g. the searched setting)
        elif typing.get_args(annotation):
            annotation = next((a for a in typing.get_args(annotation)
                               if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model




# --------------------------------------------------------------------------------------------
# The record of what a sweep folder holds, so that --resume continues that sweep and no other.
# --------------------------------------------------------------------------------------------
RECORD_FILE = "sweep.json"
RECORD_LAYOUT = 2  # 2: the harness/science, sweep, records, report package layout (folders before it have no record)
RESUME_MAY_CHANGE = ("resources", "keep_best", "keep_weights")  # where the trials run and what is kept
# of them do not change what they compute


def sweep_record(sweep: SweepConfig, kind: str, seeds: list[int] | None = None) -> dict:
    """What a sweep or study folder was started with: its kind, name, every setting of the sweep
    file as loaded (after --set and --smoke) and, for a study, its confirmation seeds."""
    return {"layout": RECORD_LAYOUT, "kind": kind, "name": sweep.name, "seeds": seeds,
            "settings": sweep.model_dump(mode="json", by_alias=True)}


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The dotted path of the first setting that differs between two JSON-like values. A key one
    side lacks and the other holds as None (an optional setting added since, e.g. claim.margin) is
    no difference."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if (key not in old and new[key] is None) or (key not in new and old[key] is None):
                continue
            if key not in old:
                return f"{where} (a setting the folder's record lacks: it was made by an earlier version of the harness)"
            if key not in new:
                return where
            found = _first_difference(old[key], new[key], where)
            if found is not None:
                return found
        return None
    return None if old == new else (path or "(the whole file)")


def check_resume(out: Path, record: dict) -> None:
    """--resume continues the sweep the folder holds, never another: the same kind, name and
    settings (`resources`, `keep_best` and `keep_weights` may change; not the budget: Tune restores a
    sweep with the trial count it started with). A folder without a record was made before the
    current package layout and cannot be resumed."""
    path = Path(out) / RECORD_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {out} was made by an older version of the harness (before the "
                          "harness/science, sweep, records, report layout) and cannot be resumed with this one; "
                          "start it again with another --out (`harness report` still reads its store)")
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {path} is unreadable ({type(exc).__name__}); this folder cannot be "
                          "resumed, start again with another --out") from None
    if held.get("kind") != record["kind"]:
        raise ConfigError(f"--resume: {out} holds a {held.get('kind')}, not a {record['kind']}; resume it with "
                          f"`harness {'ablate' if held.get('kind') == 'study' else 'sweep'}`")
    if held.get("name") != record["name"]:
        raise ConfigError(f"--resume: {out} holds sweep {held.get('name')!r}, not {record['name']!r}; resume it "
                          "with its own sweep file, or choose another --out")
    if held.get("seeds") != record["seeds"]:
        raise ConfigError(f"--resume: {out} was started with confirmation seeds {held.get('seeds')}, not "
                          f"{record['seeds']}; resume with the same --seeds")
    old = {k: v for k, v in (held.get("settings") or {}).items() if k not in RESUME_MAY_CHANGE}
    new = {k: v for k, v in record["settings"].items() if k not in RESUME_MAY_CHANGE}
    differs = _first_difference(old, new)
    if differs == "budget.num_samples":
        old_n, new_n = old["budget"]["num_samples"], new["budget"]["num_samples"]
        raise ConfigError(f"--resume: budget.num_samples {new_n} differs from the {old_n} trials {out} was started "
                          "with; Tune restores a sweep with the budget it started with, so resume with "
                          f"budget.num_samples {old_n} (and run more trials as a new sweep into another --out)")
    if differs is not None:
        raise ConfigError(f"--resume: {differs} differs from the sweep {out} was started with; resume with the "
                          f"same file and --set values (see {path}), or start again with another --out")


def write_record(out: Path, record: dict) -> None:
    """Write the folder's record (atomically: a killed driver leaves the old one or the new one)."""
    path = Path(out) / RECORD_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


CLASSIFIER_REGIME = ("classifier.", "data.")  # settings that decide which classifier a variant inverts
TPE_MIN_TRIALS, TPE_MIN_MODELLED = 8, 4  # per-variant tuning below these is close to a random choice


def check_one_regime(sweep: SweepConfig) -> None:
    """A study compares variants that differ in what its axes name, and in nothing else that
    decides the classifier: a search over `classifier.*` or `data.*` would tune each variant's
    classifier apart (e.g. avg pooling at one weight decay, max at another). Refused unless the
    file sets `classifier_confound: true`, and then the report names the confound."""
    if sweep.confirm_subset:
        varied = [f"axes.{k}" for k in sweep.axes if k == "data.subset_seed"]
        varied += [f"search.{k}" for k in sweep.search if k == "data.subset_seed"]
        varied += [f"variants.{name}.data.subset_seed" for name, changes in (sweep.named_variants or {}).items()
                   if "data.subset_seed" in (changes or {})]
        if varied:
            raise ConfigError(f"{varied[0]}: confirm_subset sets data.subset_seed to each confirmation seed, which "
                              "would replace this; set confirm_subset: false to vary the subset yourself")
    if len(sweep.variants()) < 2 or sweep.classifier_confound:
        return
    tuned = [k for k in sweep.search if k.startswith(CLASSIFIER_REGIME)]
    if tuned:
        raise ConfigError(f"search.{tuned[0]}: decides the classifier, and a study tunes it per variant, so the "
                          "variants' classifiers would differ in a setting the claim does not name; fix it in base "
                          "(one classifier regime for every variant), or set classifier_confound: true to report it "
                          "as a confound")
