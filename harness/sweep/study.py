"""`harness ablate`: a fair ablation study. For every variant of a sweep file's axes, the same
Optuna + ASHA tuning budget of the loss weights (phase `tune`), then the best weights of each
variant rerun over S seeds at full budget with no pruning (phase `confirm`). The confirmation
seeds are disjoint from every seed a tuning trial used (`SweepConfig.confirmation_seeds`), so no
confirmation run repeats the selected winner itself. One MLflow parent run per study; every trial
a child tagged with its variant and phase.

A study file's `control` adds a third phase: for every variant and confirmation seed, one untuned
run of the control's settings (e.g. the direct inverter) against the classifier that seed trains,
so the report can say whether a difference between variants is the classifiers' or the generator's.
"""
from __future__ import annotations

from pathlib import Path

from harness.config import ConfigError
from harness.sweep.tune import (SweepInterrupted, VariantOutcome, best_rows, closing_runs, record_outcome, run_variant,
                           start_driver)
from harness.sweep.files import AshaConfig, StopConfig, SweepConfig


def confirm_settings(best_config: dict, seed: int, subset: bool = True) -> dict:
    """The tuned weights with the seed of the generator, the classifier and (with `subset`) the
    training subset set to `seed`: the confirmation measures the variant over training sets and
    initialisations, not one lucky classifier on one set of images. Every variant gets the same
    settings at the same seed, so the variants stay paired."""
    return {**best_config, "seed": seed, "classifier.seed": seed, **({"data.subset_seed": seed} if subset else {})}


CLASSIFIER_KEYS = ("classifier.", "data.")  # searched settings that decide which classifier a seed trains


def control_settings(best_config: dict, seed: int, subset: bool = True) -> dict:
    """The control's settings for one confirmation seed: none of the tuned loss or inverter
    weights, but every tuned setting that decides the classifier (`classifier.*`, `data.*`), so
    that the control inverts the very classifier the confirmation run of that seed inverted."""
    return confirm_settings({k: v for k, v in best_config.items() if k.startswith(CLASSIFIER_KEYS)}, seed, subset)


def run_ablation(sweep: SweepConfig, out_dir: Path, seeds: list[int], address: str | None = None,
                 resume: bool = False, mlflow_uri: str | None = None,
                 shared_storage: bool = False) -> dict[str, dict[str, VariantOutcome]]:
    """Tune every variant, then confirm its best weights over `seeds` (which must not repeat a
    tuning seed: pass `sweep.confirmation_seeds(n)`)."""
    out_dir = out_dir.resolve()
    overlap = sorted(s for s in seeds if s <= sweep.largest_tuning_seed())
    if overlap:
        raise ConfigError(f"--seeds: confirmation seeds {overlap} may repeat a tuning seed; use "
                          f"sweep.confirmation_seeds(n) (from {sweep.confirmation_seeds(1)[0]} on)")
    resources, tracking = start_driver(sweep, out_dir, address, resume, mlflow_uri, "study",
                                       {**sweep.model_dump(), "seeds": seeds,
                                        "tuning_seed_max": sweep.largest_tuning_seed()}, shared_storage)
    confirm_sweep = sweep.model_copy(update={"asha": AshaConfig(enabled=False),
                                             "stop": StopConfig(collapse_patience=10 ** 6)})
    outcomes: dict[str, dict[str, VariantOutcome]] = {}
    with closing_runs(tracking, "study") as client:
        def record():  # summary.json and the parent run's outcome, after every phase
            record_outcome(client, tracking[0], sweep, [o for phases in outcomes.values() for o in phases.values()],
                           out_dir, "study")
        for variant, settings in sweep.variants():
            base = sweep.trial_base(settings)  # built once: the tune and confirm phases share it
            tuned = run_variant(sweep, variant, settings, out_dir, resources, tracking, "tune", resume, trial_base=base)
            outcomes[variant] = {"tune": tuned}
            record()
            if tuned.interrupted:
                raise SweepInterrupted(variant)
            best = best_rows([tuned], sweep.metric, sweep.mode, top=1)
            if not best:
                continue  # every tuning trial failed: nothing to confirm; the report says so
            fixed = [confirm_settings(best[0]["config"], s, sweep.confirm_subset) for s in seeds]
            confirmed = run_variant(confirm_sweep, variant, settings, out_dir, resources, tracking, "confirm",
                                    resume, fixed_params=fixed, trial_base=base)
            outcomes[variant]["confirm"] = confirmed
            record()
            if confirmed.interrupted:
                raise SweepInterrupted(variant)
            if sweep.control:
                control = run_variant(sweep.control_sweep(), variant, settings, out_dir, resources, tracking,
                                      "control", resume, fixed_params=[control_settings(best[0]["config"], s, sweep.confirm_subset)
                                                    for s in seeds])
                outcomes[variant]["control"] = control
                record()
                if control.interrupted:
                    raise SweepInterrupted(variant)
    return outcomes

