"""Verdicts on the difference between two variants (the study-design notes on comparisons): the per-seed
paired difference (Student-t interval, exact sign-flip permutation p) where both variants ran the
same seeds, Welch's interval for the difference of means where they did not, two one-sided tests
(TOST) for a claim of no difference within a margin, and the seeds 80% power would take. Pure
numpy, scipy and statsmodels (imported where used). The tests take arrays whose last axis holds
the seeds, so a calibration runs thousands of simulated studies in one call through the same code
as a report's verdict."""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, NamedTuple

import numpy as np

ALPHA = 0.05  # two-sided: a difference is supported when its 95% interval excludes 0
MIN_PAIRS = 3  # fewer shared seeds than this: the variants are compared unpaired (Welch)
EXACT_SIGN_FLIPS = 16  # up to this many pairs every sign pattern is enumerated (2^16); beyond, a sample
SIGN_FLIP_SAMPLES = 100_000
SIGN_FLIP_SEED = 0
PAIRED, WELCH = "paired", "welch"
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


class Difference(NamedTuple):
    """greater - lesser: `effect` (mean paired difference, or difference of means) with its
    `confidence` interval [low, high] on `df` degrees of freedom; `p` two-sided (sign-flip
    permutation p for paired, Welch's t p otherwise); `se` the effect's standard error; `sd` the
    spread that power is computed from (sd of the differences, or the pooled sd); `n1`, `n2` the
    seeds on each side (pairs: n1 == n2); `flat` where the spread is zero, so the t-interval has
    no width and the permutation p decides (`difference_kind`). Scalars, or arrays over the
    leading axes of the inputs."""
    test: str
    effect: Any
    low: Any
    high: Any
    p: Any
    se: Any
    df: Any
    sd: Any
    n1: int
    n2: int
    flat: Any


def _flat(sd, scale):
    """Zero spread, allowing for float noise (0.30 - 0.25 and 0.35 - 0.30 differ in the 17th digit)."""
    return np.asarray(sd) <= 1e-9 * np.maximum(np.asarray(scale), 1e-300)


F32_EPS = 2.0 ** -23  # twice float32's relative rounding (2^-24)


def sign_flip_p(diffs, exact_limit: int = EXACT_SIGN_FLIPS, samples: int = SIGN_FLIP_SAMPLES,
                seed: int = SIGN_FLIP_SEED, magnitude=None):
    """Two-sided permutation p of the paired differences (last axis): the share of sign patterns
    whose |sum| is at least the observed one. Every one of the 2^n patterns up to `exact_limit`
    pairs (4 pairs all of one sign: 2 of 16, p = 0.125); beyond, `samples` random patterns with a
    fixed seed, p = (k + 1) / (samples + 1).

    Patterns that tie with the observed one count. The metrics are computed in float32, so a tie can
    arrive split by float32's rounding of the values differenced (coverage 0.15 is logged as
    0.15000000596): `magnitude`, the sum over pairs of |greater| + |lesser| (default: of |d|), bounds
    that rounding, at most 2^-24 of each value, twice over for two patterns' sums."""
    d = np.asarray(diffs, dtype=float)
    n = d.shape[-1]
    if n == 0:
        return np.full(d.shape[:-1], np.nan)[()]
    observed = np.abs(d.sum(axis=-1))
    spread = np.abs(d).sum(axis=-1)
    tolerance = 1e-9 * spread + F32_EPS * (spread if magnitude is None else np.asarray(magnitude, dtype=float))
    if n <= exact_limit:
        codes = np.arange(2 ** n)[:, None] >> np.arange(n)[None, :] & 1
        signs = (1 - 2 * codes).astype(float)  # (2^n, n), the observed pattern (all +1) first
        extra = 0
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(samples, n))
        extra = 1
    hits = (np.abs(d @ signs.T) >= (observed - tolerance)[..., None]).sum(axis=-1)
    return ((hits + extra) / (len(signs) + extra))[()]


def paired_difference(greater, lesser, confidence: float = 1 - ALPHA) -> Difference:
    """The per-seed differences d_s = greater_s - lesser_s (the last axis holds the seeds, in the
    same order on both sides): their mean, Student-t interval on n - 1 df, sign-flip p."""
    from scipy import stats

    g, l = np.asarray(greater, dtype=float), np.asarray(lesser, dtype=float)
    d = g - l
    magnitude = (np.abs(g) + np.abs(l)).sum(axis=-1)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    sd = d.std(axis=-1, ddof=1) if n > 1 else np.full(mean.shape, np.nan)
    se = sd / math.sqrt(n)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * se if n > 1 else np.full(mean.shape, np.inf)
    flat = _flat(sd, np.abs(d).max(axis=-1)) if n > 1 else np.zeros(mean.shape, bool)
    return Difference(PAIRED, mean[()], (mean - half)[()], (mean + half)[()], sign_flip_p(d, magnitude=magnitude), se[()],
                      n - 1, sd[()], n, n, flat[()])


def welch_difference(greater, lesser, confidence: float = 1 - ALPHA) -> Difference:
    """Welch's interval for the difference of means (scipy.stats.ttest_ind, equal_var=False), for
    seeds that cannot be paired; `sd` is the pooled sd (what TTestIndPower's effect size takes).
    Where both sides have zero spread the t-interval has no width: `p` is then the exact
    permutation p of the two groups (2 / C(n1 + n2, n1) at equal sizes, else 1 / C)."""
    from scipy import stats

    g, l_ = np.asarray(greater, dtype=float), np.asarray(lesser, dtype=float)
    n1, n2 = g.shape[-1], l_.shape[-1]
    v1, v2 = g.var(axis=-1, ddof=1), l_.var(axis=-1, ddof=1)
    effect = g.mean(axis=-1) - l_.mean(axis=-1)
    se = np.sqrt(v1 / n1 + v2 / n2)
    pooled = np.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    flat = _flat(se, np.maximum(np.abs(g).max(axis=-1), np.abs(l_).max(axis=-1)))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = stats.ttest_ind(g, l_, axis=-1, equal_var=False)
        ci = result.confidence_interval(confidence)
    low, high, p, df = (np.asarray(x, dtype=float) for x in (ci.low, ci.high, result.pvalue, result.df))
    exact = (2 if n1 == n2 else 1) / math.comb(n1 + n2, n1)
    low, high = np.where(flat, effect, low), np.where(flat, effect, high)
    p = np.where(flat, np.where(effect == 0, 1.0, exact), p)
    return Difference(WELCH, effect[()], low[()], high[()], p[()], se[()], df[()], pooled[()], n1, n2, flat[()])


def difference_kind(diff: Difference, alpha: float = ALPHA):
    """The verdict on "greater > lesser": supported where the difference's interval (computed at
    1 - alpha) lies above 0 and its p (the exact sign-flip p of a paired difference, the check that
    needs no normality; Welch's p, or the exact group permutation p where both sides have no
    spread) is below `alpha`; not supported (the opposite holds) where the interval lies below 0
    with p below `alpha`; inconclusive otherwise. One rule for every spread, so a more consistent
    difference never gets a weaker verdict: with n pairs the sign-flip p is at least 2 / 2^n, so a
    paired claim needs 6 seeds to be decided. Elementwise on arrays."""
    p = np.asarray(diff.p)
    low, high = np.asarray(diff.low), np.asarray(diff.high)
    above = (low > 0) & (p < alpha)
    below = (high < 0) & (p < alpha)
    return np.where(above, SUPPORTED, np.where(below, NOT_SUPPORTED, INCONCLUSIVE))[()]


def interval_kind(diff: Difference):
    """The t-interval's reading alone (above 0, below 0, or containing it), without the
    permutation check: what the noncentral t's power describes (tests/test_calibration.py)."""
    low, high = np.asarray(diff.low), np.asarray(diff.high)
    return np.where(low > 0, SUPPORTED, np.where(high < 0, NOT_SUPPORTED, INCONCLUSIVE))[()]


def min_paired_seeds(alpha: float = ALPHA) -> int:
    """The fewest pairs whose smallest two-sided sign-flip p, 2 / 2^n, is below `alpha` (6 at 5%)."""
    n = 1
    while 2 / 2 ** n >= alpha:
        n += 1
    return n


class Equivalence(NamedTuple):
    """TOST of |greater - lesser| < margin: `p` the larger of the two one-sided p's, the (1 - 2 alpha)
    interval [low, high] (90%) that lies within ±margin exactly when p < alpha, and the 95%
    interval [low95, high95]."""
    margin: float
    p: Any
    low: Any
    high: Any
    low95: Any
    high95: Any


def equivalence(diff: Difference, margin: float, alpha: float = ALPHA) -> Equivalence:
    """Two one-sided t-tests on `diff` (paired or Welch, its se and df): H0 effect <= -margin and
    H0 effect >= margin, each at `alpha` (statsmodels' ttost_paired / ttost_ind, usevar unequal)."""
    from scipy import stats

    effect, se, df = np.asarray(diff.effect, float), np.asarray(diff.se, float), np.asarray(diff.df, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_low = stats.t.sf((effect + margin) / se, df)   # H0: effect <= -margin
        p_high = stats.t.cdf((effect - margin) / se, df)  # H0: effect >= margin
    p = np.maximum(p_low, p_high)
    p = np.where(np.asarray(diff.flat), np.where(np.abs(effect) < margin, 0.0, 1.0), p)
    h90, h95 = stats.t.ppf(1 - alpha, df) * se, stats.t.ppf(1 - alpha / 2, df) * se
    h90, h95 = np.where(np.asarray(diff.flat), 0.0, h90), np.where(np.asarray(diff.flat), 0.0, h95)
    return Equivalence(margin, p[()], (effect - h90)[()], (effect + h90)[()], (effect - h95)[()], (effect + h95)[()])


def equivalence_kind(eq: Equivalence, alpha: float = ALPHA):
    """supported where both one-sided p's are below `alpha` (the 90% interval inside ±margin); not
    supported where the 95% interval lies wholly outside the band; inconclusive otherwise."""
    p, low95, high95 = np.asarray(eq.p), np.asarray(eq.low95), np.asarray(eq.high95)
    outside = (low95 >= eq.margin) | (high95 <= -eq.margin)
    return np.where(p < alpha, SUPPORTED, np.where(outside, NOT_SUPPORTED, INCONCLUSIVE))[()]


def seeds_for_power(diff: Difference, power: float = 0.8, alpha: float = ALPHA) -> float:
    """Seeds (per variant) that `power` at a two-sided `alpha` would take at the observed effect
    and spread, rounded up: statsmodels' TTestPower on effect / sd of the differences (paired),
    TTestIndPower on effect / pooled sd (Welch). inf where there is no effect or no spread to
    judge by; never fewer than the test can decide at (6 pairs, whose smallest sign-flip p is 2/64)."""
    effect, sd = float(diff.effect), float(diff.sd)
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0:
        return math.inf
    floor = min_paired_seeds(alpha) if diff.test == PAIRED else 4  # 2 / C(8, 4) < 0.05 for a flat Welch
    if diff.flat or sd == 0:
        return floor
    from statsmodels.stats.power import TTestIndPower, TTestPower

    analysis = TTestPower() if diff.test == PAIRED else TTestIndPower()
    size = abs(effect) / sd
    if analysis.power(size, 2, alpha, alternative="two-sided") >= power:  # nobs (TTestPower), nobs1
        return floor  # where the root finder would fail: 2 seeds already suffice for the t-interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            n = float(analysis.solve_power(effect_size=size, alpha=alpha, power=power, alternative="two-sided"))
        except Exception:  # noqa: BLE001 - the root finder gives up at tiny effects
            n = math.nan
    return max(floor, math.ceil(n - 1e-9)) if math.isfinite(n) else math.inf


def shared_seeds(greater: Iterable[tuple[Any, float]], lesser: Iterable[tuple[Any, float]]) -> list[Any]:
    """The seeds each side ran exactly once (a run without a seed, None, pairs with nothing), in
    order: what a paired comparison is taken over."""
    def once(pairs):
        seen: dict[Any, int] = {}
        for seed, _ in pairs:
            if seed is not None:
                seen[seed] = seen.get(seed, 0) + 1
        return {s for s, k in seen.items() if k == 1}
    return sorted(once(greater) & once(lesser))


def compare(greater: list[tuple[Any, float]], lesser: list[tuple[Any, float]]) -> Difference | None:
    """greater - lesser from each side's (seed, value) pairs: paired over the shared seeds where
    there are at least `MIN_PAIRS`, else Welch over every value; None with fewer than 2 a side."""
    shared = shared_seeds(greater, lesser)
    if len(shared) >= MIN_PAIRS:
        g, l_ = dict(greater), dict(lesser)
        return paired_difference([g[s] for s in shared], [l_[s] for s in shared])
    if len(greater) < 2 or len(lesser) < 2:
        return None
    return welch_difference([v for _, v in greater], [v for _, v in lesser])
