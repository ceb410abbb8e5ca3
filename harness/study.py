"""`harness ablate`: a fair ablation study. For every variant of a sweep file's axes, the same
Optuna + ASHA tuning budget of the loss weights (phase `tune`), then the best weights of each
variant rerun over S seeds at full budget with no pruning (phase `confirm`). One MLflow parent
run per study; every trial a child tagged with its variant and phase.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.sweep import (SweepInterrupted, VariantOutcome, best_rows, closing_runs, record_outcome, run_variant,
                           start_driver)
from harness.sweep_config import AshaConfig, StopConfig, SweepConfig

def confirm_settings(best_config: dict, seed: int) -> dict:
    """The tuned weights with the seed of both the generator and the classifier set to `seed`:
    the confirmation measures the variant, not one lucky classifier."""
    return {**best_config, "seed": seed, "classifier.seed": seed}


def run_ablation(sweep: SweepConfig, out_dir: Path, seeds: list[int], address: str | None = None,
                 resume: bool = False, mlflow_uri: str | None = None) -> dict[str, dict[str, VariantOutcome]]:
    out_dir = out_dir.resolve()
    resources, tracking = start_driver(sweep, out_dir, address, resume, mlflow_uri, "study",
                                       {**sweep.model_dump(), "seeds": seeds})
    confirm_sweep = sweep.model_copy(update={"asha": AshaConfig(enabled=False),
                                             "stop": StopConfig(collapse_patience=10 ** 6)})
    outcomes: dict[str, dict[str, VariantOutcome]] = {}
    with closing_runs(tracking, "study") as client:
        def record():  # summary.json and the parent run's outcome, after every phase
            record_outcome(client, tracking[0], sweep, [o for phases in outcomes.values() for o in phases.values()],
                           out_dir, "study")
        for variant, settings in sweep.variants():
            tuned = run_variant(sweep, variant, settings, out_dir, resources, tracking, "tune", resume)
            outcomes[variant] = {"tune": tuned}
            record()
            if tuned.interrupted:
                raise SweepInterrupted(variant)
            best = best_rows([tuned], sweep.metric, sweep.mode, top=1)
            if not best:
                continue  # every tuning trial failed: nothing to confirm; the report says so
            fixed = [confirm_settings(best[0]["config"], s) for s in seeds]
            confirmed = run_variant(confirm_sweep, variant, settings, out_dir, resources, tracking, "confirm",
                                    resume, fixed_params=fixed)
            outcomes[variant]["confirm"] = confirmed
            record()
            if confirmed.interrupted:
                raise SweepInterrupted(variant)
    return outcomes


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over seeds; a single value has an infinite interval."""
    from scipy import stats

    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("-inf"), float("inf")
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    half = stats.t.ppf(0.5 + confidence / 2, len(vals) - 1) * sd / len(vals) ** 0.5
    return mean, mean - half, mean + half
