"""Calibration of the verdict rule as a known-answer test: thousands of simulated studies where the
truth is known, run through the same functions a report's verdict is decided by
(`harness.records.differences`: paired_difference / welch_difference, then difference_kind), vectorised
over the simulations. Under no effect the rule may say "supported" at most at its nominal rate
(2.5% one-sided, 5% either way, for a two-sided 95% interval) plus Monte Carlo error, paired and
unpaired, for normal values and for bounded, skewed, discrete values like coverage at 20 images;
under a known shift the paired rule finds it as often as the noncentral t says."""
import math

import numpy as np
import pytest
from scipy import stats

from harness.records.differences import (difference_kind, interval_kind, paired_difference, seeds_for_power,
                                         welch_difference)
from harness.report.verdicts import claim_verdict, verdict_kind

SIMS = 2000
SEEDS = (3, 4, 6, 10)


def _se(rate: float) -> float:
    return math.sqrt(rate * (1 - rate) / SIMS)


def _coverage(rate, rng):
    """Coverage of 20 images: a count out of 20 at the given per-image rate, in steps of 0.05."""
    return rng.binomial(20, rate) / 20


def _null(kind: str, paired: bool, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(greater, lesser), each SIMS x n, from one distribution: paired, a shared per-seed effect
    plus per-variant noise; unpaired, every value independent."""
    shape = (SIMS, n)
    if kind == "normal":
        seed_effect = rng.normal(0.3, 0.1, (SIMS, n, 1) if paired else (SIMS, n, 2))
        values = seed_effect + rng.normal(0, 0.05, (SIMS, n, 2))
    elif kind == "coverage":  # a skewed per-seed rate on [0, 1], then 20 images
        rate = rng.beta(2, 5, (SIMS, n, 1) if paired else (SIMS, n, 2))
        values = _coverage(np.broadcast_to(rate, (SIMS, n, 2)), rng)
    elif kind == "rare coverage":  # most seeds recover no image: many zeros and ties
        rate = rng.beta(0.5, 8, (SIMS, n, 1) if paired else (SIMS, n, 2))
        values = _coverage(np.broadcast_to(rate, (SIMS, n, 2)), rng)
    elif kind == "clipped":  # normal, clipped to [0, 1] and rounded to 0.05: a pile at 0
        seed_effect = rng.normal(0.1, 0.1, (SIMS, n, 1) if paired else (SIMS, n, 2))
        values = np.round(np.clip(seed_effect + rng.normal(0, 0.1, (SIMS, n, 2)), 0, 1) * 20) / 20
    else:
        raise ValueError(kind)
    assert values.shape == (*shape, 2)
    return values[..., 0], values[..., 1]


@pytest.mark.parametrize("kind", ["normal", "coverage", "rare coverage", "clipped"])
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_no_effect_is_supported_at_most_at_the_nominal_rate(kind, paired):
    rng = np.random.default_rng(20240527 + 7 * paired + len(kind))
    for n in SEEDS:
        greater, lesser = _null(kind, paired, n, rng)
        diff = (paired_difference if paired else welch_difference)(greater, lesser)
        verdicts = np.asarray(difference_kind(diff))
        assert verdicts.shape == (SIMS,)
        supported = np.mean(verdicts == "supported")
        either = np.mean(verdicts != "inconclusive")
        assert supported <= 0.025 + 3 * _se(0.025), (kind, paired, n, supported)
        assert either <= 0.05 + 3 * _se(0.05), (kind, paired, n, either)


@pytest.mark.parametrize("n, size", [(4, 1.5), (6, 1.0), (10, 0.6)])
def test_paired_power_matches_the_noncentral_t(n, size):
    """d_s ~ N(delta, sd) with a per-seed effect shared by both variants: the rule says supported
    where t = mean / (sd / sqrt n) exceeds t(0.975, n - 1), which happens with probability
    P(T' > t_crit) for T' noncentral t on n - 1 df with noncentrality delta / sd * sqrt n."""
    rng = np.random.default_rng(1000 + n)
    noise = 0.05  # per variant; the sd of a difference is noise * sqrt 2
    delta = size * noise * math.sqrt(2)
    seed_effect = rng.normal(0.3, 0.2, (SIMS, n))
    greater = seed_effect + delta + rng.normal(0, noise, (SIMS, n))
    lesser = seed_effect + rng.normal(0, noise, (SIMS, n))
    diff = paired_difference(greater, lesser)
    crit = stats.t.ppf(0.975, n - 1)
    expected = stats.nct.sf(crit, n - 1, size * math.sqrt(n))
    rate = np.mean(np.asarray(interval_kind(diff)) == "supported")  # the t-interval's reading alone
    assert abs(rate - expected) <= 3 * _se(expected), (rate, expected)
    # the verdict also asks the sign-flip p to agree: never more often than the interval alone, never
    # below 6 pairs (2 / 2^n >= 0.05), at 6 pairs only when every difference has one sign, and at 10
    # pairs it costs little power
    verdict = np.mean(np.asarray(difference_kind(diff)) == "supported")
    assert verdict <= rate
    assert (verdict == 0) if n < 6 else (verdict > 0) if n < 10 else (verdict >= rate - 0.1), (n, verdict, rate)
    # statsmodels' TTestPower, which `seeds_for_power` solves, is the same two-sided power
    from statsmodels.stats.power import TTestPower

    two_sided = expected + stats.nct.cdf(-crit, n - 1, size * math.sqrt(n))
    assert TTestPower().power(size, n, 0.05) == pytest.approx(two_sided, rel=1e-6)


def test_the_seeds_power_asks_for_find_the_effect_80_percent_of_the_time():
    """At the effect size a pilot observed (mean / sd = 1), `seeds_for_power` asks for 10 seeds;
    simulated studies of 10 seeds at that true effect find it in 80% of them."""
    pilot = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # differences 1, 2, 3: mean 2, sd 1
    pilot = pilot._replace(effect=1.0)  # effect size 1
    n = seeds_for_power(pilot)
    assert n == 10  # TTestPower: 9.94, rounded up
    rng = np.random.default_rng(7)
    d = rng.normal(1.0, 1.0, (SIMS, n))
    diff = paired_difference(d, np.zeros_like(d))
    found = np.mean(np.asarray(interval_kind(diff)) != "inconclusive")
    exact = stats.nct.sf(stats.t.ppf(0.975, n - 1), n - 1, math.sqrt(n))
    assert exact >= 0.8 and abs(found - exact) <= 3 * _se(exact), (found, exact)
    # the verdict, which also asks the sign-flip p (at 10 pairs as low as 2/1024), finds it nearly as often
    verdict = np.mean(np.asarray(difference_kind(diff)) != "inconclusive")
    assert found - 0.06 <= verdict <= found, (verdict, found)


def test_the_report_verdict_decides_as_the_vectorised_rule():
    """claim_verdict, fed (seed, value) pairs as a report does, agrees study by study with the rule
    the calibration drives: paired where the seeds are shared, Welch where they are not."""
    params = {"claim.statement": "a beats b", "claim.metric": "coverage_gap", "claim.greater": "a",
              "claim.lesser": "b", "claim.reference": "None"}
    rng = np.random.default_rng(11)
    n, sims = 7, 60  # 7 pairs: the sign-flip p can reach 2/128
    seed_effect = rng.normal(0.3, 0.1, (sims, n))
    greater = seed_effect + 0.05 + rng.normal(0, 0.05, (sims, n))
    lesser = seed_effect + rng.normal(0, 0.05, (sims, n))
    for paired, rule in ((True, paired_difference), (False, welch_difference)):
        expected = np.asarray(difference_kind(rule(greater, lesser)))
        assert 0 < np.mean(expected == "supported") < 1  # both outcomes occur: the comparison is not vacuous
        from harness.records.results import mean_ci

        for g, l_, kind in zip(greater, lesser, expected):
            stats_ = {"a": {"coverage_gap": mean_ci(g)}, "b": {"coverage_gap": mean_ci(l_)}}
            seeds = range(1000, 1000 + n)
            values = {"a": list(zip(seeds, g)), "b": list(zip(seeds if paired else range(2000, 2000 + n), l_))}
            text = claim_verdict(params, stats_, {}, values)
            assert verdict_kind(text) == kind, text
            assert ("paired by seed" in text) == paired
