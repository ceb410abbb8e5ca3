"""How trials are summarised: the one rule that picks the best trial, and the confidence
interval over seeds. Pure Python and scipy (no torch, no Ray, no MLflow): the sweep summary,
`harness ablate` and `harness report` all decide through these functions."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, TypeVar

T = TypeVar("T")


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def qualifies(failed: bool, metrics: dict[str, Any], metric: str) -> bool:
    """Whether a trial may be called best: it finished or was stopped early (pruned, collapsed),
    never failed, its loss never became NaN/inf, and its `metric` is a finite number."""
    return not failed and not metrics.get("nonfinite") and is_finite_number(metrics.get(metric))


def budget_reached(metrics: dict[str, Any]) -> float:
    """The epochs a trial ran before it ended or was stopped (0 when it recorded none)."""
    value = metrics.get("epoch", metrics.get("training_iteration"))
    return float(value) if is_finite_number(value) else 0.0


def best_trials(trials: Iterable[T], metric: str, mode: str, top: int | None = 1, *,
                metrics: Callable[[T], dict], failed: Callable[[T], bool],
                started: Callable[[T], Any] | None = None) -> list[T]:
    """The `top` best qualifying trials, best first, ranked at equal budget: the trials that ran
    the most epochs come first (a trial ASHA stopped at an early rung holds a value measured at a
    smaller budget, not comparable with a finished trial's), and among trials of one budget the
    best `metric` (`mode` max or min) leads; ties go to the trial that started first: by
    `started(t)` where given (an MLflow run's start time; the report reads runs newest first),
    else by the input order (a sweep's results, in the order Ray created the trials). So the
    sweep's summary and its report pick the same trial. `metrics(t)` and `failed(t)` read a
    trial, whatever its container."""
    ok = [t for t in trials if qualifies(failed(t), metrics(t), metric)]
    if started is not None:
        ok.sort(key=started)
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(ok, key=lambda t: (-budget_reached(metrics(t)), sign * metrics(t)[metric]))
    return ranked if top is None else ranked[:top]


def finite(values: Iterable[Any]) -> list[float]:
    """The finite numbers among `values` (None, NaN, inf and non-numbers left out)."""
    return [float(v) for v in values if is_finite_number(v)]


def sample_sd(values: Iterable[Any]) -> float:
    """Sample standard deviation (n - 1) of the finite values; NaN for fewer than two."""
    vals = finite(values)
    if len(vals) < 2:
        return float("nan")
    mean = sum(vals) / len(vals)
    return (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5


def count_at_one(values: Iterable[Any]) -> tuple[int, int]:
    """(how many of the finite values of a 0/1 metric are 1, how many finite values)."""
    vals = finite(values)
    return sum(1 for v in vals if v >= 0.5), len(vals)


def fisher_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p-value of Fisher's exact test that a rate of k1/n1 is larger than k2/n2."""
    from scipy import stats

    return float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="greater").pvalue)


class MeanCI(NamedTuple):
    """Mean and confidence interval of the finite values; n is how many were averaged."""
    mean: float
    low: float
    high: float
    n: int


def mean_ci(values: Iterable[Any], confidence: float = 0.95) -> MeanCI:
    """Student-t interval over seeds of the finite values (NaN, inf and missing values are left
    out and not counted); a single value has an infinite interval, none gives NaN."""
    from scipy import stats

    vals = finite(values)
    n = len(vals)
    if not vals:
        return MeanCI(float("nan"), float("nan"), float("nan"), 0)
    mean = sum(vals) / n
    if n < 2:
        return MeanCI(mean, float("-inf"), float("inf"), 1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sample_sd(vals) / n ** 0.5
    return MeanCI(mean, mean - half, mean + half, n)


FISHER_ALPHA = 0.05  # a count claim (collapsed) is supported when Fisher's one-sided p is below this


def fisher_smallest_p(n1: int, n2: int) -> float:
    """The smallest one-sided p-value `fisher_greater` can give with n1 and n2 runs a side: every
    run of the first side at 1 and none of the second, 1 / C(n1 + n2, n1) (3 runs a side: 1/20,
    so p < 0.05 is out of reach; 4: 1/70). No other table goes lower: with k runs at 1 in all,
    the most lopsided table's p is C(n1, k) / C(n1 + n2, k) for k <= n1, which falls until
    k = n1, and rises for k > n1."""
    return 1 / math.comb(n1 + n2, n1)


TAG_OUTCOME = "harness.outcome"  # how a trial ended: finished / pruned / collapsed / nonfinite / timed_out / failed


def enters_counts(status: str, metrics: dict[str, Any], outcome: str | None = None) -> bool:
    """Whether a run enters the count of a 0/1 outcome (collapsed): every run that enters the
    averages, and a run the collapse stopper ended (`outcome` collapsed; a summary.json row's
    status word): its collapse, seen at `collapse_patience` evaluations in a row, is what is counted.
    Left out of the averages (its other metrics are of a shorter budget), never out of the count."""
    return enters_averages(status, metrics)[0] or (outcome or status) == "collapsed"


def enters_averages(status: str, metrics: dict[str, Any]) -> tuple[bool, str]:
    """(whether a run enters a study's averages, why not): its mean ± CI, Fisher's counts, the
    spread over seeds and so every verdict. Only a run that ended normally (MLflow status FINISHED;
    a summary.json row's outcome `finished`) with a loss that never became NaN/inf does. A failed or
    still-running run holds partial-budget values, and a run whose loss went NaN is stopped and
    logged `collapsed` = 1, a collapse it never had. `status` is either word for how the run ended."""
    if status in ("FINISHED", "finished") and not metrics.get("nonfinite"):
        return True, ""
    if status in ("FAILED", "failed"):
        return False, "failed"
    if status in ("RUNNING", "SCHEDULED"):
        return False, "still running"
    if metrics.get("nonfinite") or status == "nonfinite":
        return False, "loss non-finite"
    if status == "interrupted":  # a summary.json row of a trial the driver's interrupt left unended
        return False, "interrupted"
    return False, "stopped early"  # KILLED: pruned, collapse-stopped or interrupted
