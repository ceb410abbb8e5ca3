"""Known answers for the rules a report decides by (`harness.report.verdicts`), on hand-made numbers and
run records: no MLflow store, no figures."""
import subprocess
import sys
from types import SimpleNamespace

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness.records.differences import (difference_kind, equivalence, paired_difference, seeds_for_power, sign_flip_p,
                                         welch_difference)
from harness.records.results import MeanCI, mean_ci
from harness.report.verdicts import (averaged_runs, claim_verdict, control_reading, exclusion, verdict_kind,
                              yardstick)


# -- claim_verdict in every branch --------------------------------------------------------------
PARAMS = {"claim.statement": "avg leaks more than max", "claim.metric": "ssim_nn_train_mean",
          "claim.greater": "pool=avg", "claim.lesser": "pool=max", "claim.reference": "None"}


def _by_seed(avg, mx, avg_seeds=(1000, 1001, 1002, 1003), mx_seeds=(1000, 1001, 1002, 1003)):
    """Stats and per-seed values of both variants, as `harness.report.write` passes them."""
    stats = {"pool=avg": {"ssim_nn_train_mean": mean_ci(avg)}, "pool=max": {"ssim_nn_train_mean": mean_ci(mx)}}
    return stats, {"pool=avg": list(zip(avg_seeds, avg)), "pool=max": list(zip(mx_seeds, mx))}


@pytest.mark.parametrize("avg, mx, verdict", [
    # six seeds: differences 0.20, 0.22, 0.18 twice; sign-flip p 2/64
    ((0.30, 0.33, 0.32) * 2, (0.10, 0.11, 0.14) * 2, "**supported**"),
    ((0.10, 0.11, 0.14) * 2, (0.30, 0.33, 0.32) * 2, "**not supported** (the opposite holds)"),
    # the means differ but the differences 0.10, -0.10, 0.05 straddle 0: no verdict either way
    ((0.30, 0.20, 0.35) * 2, (0.20, 0.30, 0.30) * 2, "**inconclusive**"),
    # the separate intervals overlap (the seeds share an offset), the paired differences 0.10, 0.20,
    # 0.15 (twice) do not: the difference is what the claim is about
    ((0.30, 0.45, 0.40) * 2, (0.20, 0.25, 0.25) * 2, "**supported**"),
    # three seeds: the t-interval of 0.20, 0.22, 0.18 lies above 0, but the sign-flip p cannot go
    # below 2/8: no verdict, and the line says it takes 6 seeds
    ((0.30, 0.33, 0.32), (0.10, 0.11, 0.14), "**inconclusive**"),
])
def test_claim_between_variants(avg, mx, verdict):
    seeds = tuple(range(1000, 1000 + len(avg)))
    stats, values = _by_seed(avg, mx, seeds, seeds)
    text = claim_verdict(PARAMS, stats, {}, values)
    assert text.startswith(verdict + ":") or text.startswith(verdict + " "), text
    assert f"n={len(avg)}" in text and f"paired by seed over {len(avg)} seeds" in text
    if len(avg) == 3 and verdict == "**inconclusive**":
        assert "the smallest attainable is 0.250, so it takes at least 6 seeds" in text


# the pooling example: greater and lesser at the same seeds 1000-1003
POOL_G, POOL_L = (0.30, 0.50, 0.45, 0.30), (0.10, 0.20, 0.15, 0.20)


def test_paired_difference_known_answer():
    d = [g - l for g, l in zip(POOL_G, POOL_L)]  # 0.20, 0.30, 0.30, 0.10
    sd = (sum((x - 0.225) ** 2 for x in d) / 3) ** 0.5  # sqrt(0.0275 / 3) = 0.0957
    half = sps.t.ppf(0.975, 3) * sd / 2  # 3.182 x 0.0957 / sqrt(4) = 0.152
    diff = paired_difference(POOL_G, POOL_L)
    assert diff.test == "paired" and diff.n1 == diff.n2 == 4 and diff.df == 3
    assert diff.effect == pytest.approx(0.225)
    assert (diff.low, diff.high) == pytest.approx((0.225 - half, 0.225 + half))
    assert (round(float(diff.low), 2), round(float(diff.high), 2)) == (0.07, 0.38)
    assert diff.p == pytest.approx(2 / 16)  # all four positive: that pattern and its mirror of 16
    # the t-interval lies above 0, but four pairs cannot reach a sign-flip p below 2/16: the check
    # that needs no normality does not confirm it, so no verdict (it takes 6 pairs)
    assert difference_kind(diff) == "inconclusive"
    assert difference_kind(paired_difference(POOL_G * 2, POOL_L * 2)) == "supported"  # 8 pairs: p 2/256
    # the old rule, separate intervals that do not overlap, would not say it even at 8 seeds: the
    # four-seed intervals overlap
    g, l_ = mean_ci(POOL_G), mean_ci(POOL_L)
    assert g.low < l_.high
    stats_, values = _by_seed(POOL_G, POOL_L)
    text = claim_verdict(PARAMS, stats_, {}, values)
    assert text.startswith("**inconclusive**: avg leaks more than max. ssim_nn_train_mean: pool=avg 0.388 ± 0.164 (n=4) "
                           "vs pool=max 0.163 ± 0.076 (n=4)"), text
    assert ("paired by seed over 4 seeds both ran: mean 0.225, 95% CI [0.073, 0.377] (Student t, 3 df); sign-flip "
            "permutation p = 0.125 (exact, all 16 sign patterns; the smallest attainable with 4 pairs is 0.125)") in text
    # effect / sd = 2.35: TTestPower solves 80% power at n = 3.6, but the sign-flip p needs 6 pairs
    assert "80% power at this effect and spread (sd of the differences 0.096) takes about 6 paired seeds" in text


def test_sign_flip_p_known_answers():
    # 0.1, 0.2, 0.3, -0.05: |sum| 0.55; of the 16 patterns those with |sum| >= 0.55 are (+ + + -),
    # (+ + + +) = 0.65 and their mirrors: 4 of 16
    assert sign_flip_p([0.1, 0.2, 0.3, -0.05]) == pytest.approx(4 / 16)
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p([0.1] * 8) == pytest.approx(2 / 256)  # the design notes' smallest p at n = 8
    # ties arrive with float32's rounding: coverage_gap per seed of pooling_paired_fashion, in steps of
    # 0.05 (1 of 20 images), as MLflow holds them (float32 values widened). In steps, the differences
    # are 1, -1, 1, -5, 1, -2, -1, 1 (sum -5); the sign patterns of 1, 1, 1, 5, 1, 2, 1, 1 with |sum| >= 5,
    # counted by hand: with +5, the other seven (1, 1, 1, 1, 1, 1, 2) must sum to >= 0 or <= -10: 79
    # of 128; mirrored, 158 of 256
    avg = np.float32([0.1, 0.15, 0.15, 0.1, 0.05, 0.05, 0.0, 0.1]).astype(float)
    mx = np.float32([0.05, 0.2, 0.1, 0.35, 0.0, 0.15, 0.05, 0.05]).astype(float)
    assert sign_flip_p(avg - mx) == pytest.approx(158 / 256)
    assert paired_difference(avg, mx).p == pytest.approx(158 / 256)
    # the same ties on values near 500 (a Fréchet distance): float32 spaces them 3e-5 apart, so the
    # rounding that splits a tie is set by the values, not by the differences
    assert paired_difference(np.float32(avg + 500).astype(float), np.float32(mx + 500).astype(float)).p == \
        pytest.approx(158 / 256)
    # and differences far below 1 are not ties: 8 equal differences of 1e-7, all one sign, p = 2/256
    assert sign_flip_p([1e-7] * 8) == pytest.approx(2 / 256)
    assert paired_difference([2e-7] * 8, [1e-7] * 8).p == pytest.approx(2 / 256)
    # above 16 pairs a fixed-seed sample of 100,000 patterns: within Monte Carlo error of the exact p
    d = np.random.default_rng(3).normal(0.3, 1.0, 17)
    exact = sign_flip_p(d, exact_limit=17)
    sampled = sign_flip_p(d)
    assert abs(sampled - exact) < 4 * (exact * (1 - exact) / 100_000) ** 0.5 + 1e-5
    assert sign_flip_p(d) == sampled  # the same seed, the same p
    # vectorised over simulated studies: row by row the same
    rows = np.random.default_rng(4).normal(size=(5, 6))
    assert np.allclose(sign_flip_p(rows), [sign_flip_p(r) for r in rows])


def test_welch_difference_known_answer():
    # the pooling numbers at seeds that differ: nothing to pair
    v1, v2 = np.var(POOL_G, ddof=1), np.var(POOL_L, ddof=1)  # 0.009792 and 0.002292
    se = (v1 / 4 + v2 / 4) ** 0.5  # 0.0568
    df = se ** 4 / ((v1 / 4) ** 2 / 3 + (v2 / 4) ** 2 / 3)  # Welch-Satterthwaite: 4.24
    half = sps.t.ppf(0.975, df) * se
    diff = welch_difference(POOL_G, POOL_L)
    assert diff.test == "welch" and (diff.n1, diff.n2) == (4, 4)
    assert diff.effect == pytest.approx(0.225) and diff.df == pytest.approx(df)
    assert (diff.low, diff.high) == pytest.approx((0.225 - half, 0.225 + half))
    assert diff.p == pytest.approx(2 * sps.t.sf(0.225 / se, df))
    assert diff.sd == pytest.approx(((v1 + v2) / 2) ** 0.5)  # the pooled sd
    stats_, values = _by_seed(POOL_G, POOL_L, mx_seeds=(2000, 2001, 2002, 2003))
    text = claim_verdict(PARAMS, stats_, {}, values)
    assert text.startswith("**supported**"), text
    assert ("difference of means pool=avg − pool=max, unpaired (Welch's t; fewer than 3 seeds ran once on both "
            "sides): 0.225, 95% CI [0.071, 0.379] (Welch, 4.2 df); Welch p = 0.015; n = 4 and 4 runs") in text
    assert "takes about 4 seeds per variant" in text


def test_verdict_pairs_the_shared_seeds_and_falls_back_to_welch():
    # four shared seeds and one run of pool=avg without a partner: paired over the four
    stats_, values = _by_seed((*POOL_G, 0.9), POOL_L, avg_seeds=(1000, 1001, 1002, 1003, 1004))
    text = claim_verdict(PARAMS, stats_, {}, values)
    assert "paired by seed over 4 seeds both ran (1 run without a partner left out): mean 0.225" in text
    # two shared seeds are too few to pair: Welch over every run
    stats_, values = _by_seed(POOL_G, POOL_L, mx_seeds=(1000, 1001, 2002, 2003))
    assert "unpaired (Welch's t" in claim_verdict(PARAMS, stats_, {}, values)
    # a seed that repeats within a variant (tuning trials at one seed) pairs with nothing
    stats_, values = _by_seed(POOL_G, POOL_L, avg_seeds=(0, 0, 0, 0), mx_seeds=(0, 0, 0, 0))
    assert "unpaired (Welch's t" in claim_verdict(PARAMS, stats_, {}, values)
    # one run a side: no difference can be judged
    stats_, values = _by_seed(POOL_G[:1], POOL_L[:1], (1000,), (1000,))
    assert claim_verdict(PARAMS, stats_, {}, values).startswith("**inconclusive**")
    assert "a difference needs at least 2 runs of each variant" in claim_verdict(PARAMS, stats_, {}, values)


def test_zero_spread_is_decided_by_the_permutation_p():
    # coverage moves in steps of 0.05: three seeds all +0.05 give a t-interval of no width, which
    # is no test; the sign-flip p (2/8) decides: inconclusive. Six seeds: 2/64 < 0.05
    three = paired_difference([0.30, 0.40, 0.35], [0.25, 0.35, 0.30])
    assert bool(three.flat) and difference_kind(three) == "inconclusive" and three.p == pytest.approx(0.25)
    six = paired_difference([0.30, 0.40, 0.35] * 2, [0.25, 0.35, 0.30] * 2)
    assert difference_kind(six) == "supported" and six.p == pytest.approx(2 / 64)
    assert difference_kind(paired_difference([0.3] * 6, [0.3] * 6)) == "inconclusive"
    # unpaired with no spread on either side: the exact permutation p of the groups, 2 / C(6, 3) = 0.1
    flat = welch_difference([1.0, 1.0, 1.0], [0.95, 0.95, 0.95])
    assert bool(flat.flat) and flat.p == pytest.approx(0.1) and difference_kind(flat) == "inconclusive"
    assert difference_kind(welch_difference([1.0] * 4, [0.95] * 4)) == "supported"  # 2 / 70
    stats_, values = _by_seed((0.30, 0.40, 0.35), (0.25, 0.35, 0.30), (1, 2, 3), (1, 2, 3))
    text = claim_verdict(PARAMS, stats_, {}, values)
    assert text.startswith("**inconclusive**") and "the spread is zero" in text


def test_seeds_for_power_known_answers():
    # differences -0.5, 0.5, 1.5: mean 0.5, sd 1, effect size 0.5; TTestPower: 33.37 -> 34 seeds (the
    # normal approximation ((1.96 + 0.84) / 0.5)^2 + 2 = 33.4)
    diff = paired_difference([0.5, 1.5, 2.5], [1.0, 1.0, 1.0])
    assert seeds_for_power(diff) == 34
    assert seeds_for_power(paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])) == math.inf  # no effect
    assert seeds_for_power(paired_difference([10.0, 10.1, 10.2], [0.0, 0.0, 0.0])) == 6  # huge: the sign-flip floor
    # Welch: effect / pooled sd = 1: TTestIndPower 16.7 -> 17 per variant
    assert seeds_for_power(welch_difference([0.0, 1.0, 2.0], [-1.0, 0.0, 1.0])) == 17
    stats_, values = _by_seed((0.5, 1.5, 2.5), (1.0, 1.0, 1.0), (1, 2, 3), (1, 2, 3))
    assert "takes about 34 paired seeds" in claim_verdict(PARAMS, stats_, {}, values)


EQUIV = {**PARAMS, "claim.statement": "pooling does not change leakage"}


@pytest.mark.parametrize("margin, verdict", [
    (0.5, "**supported**"),      # 90% CI [0.112, 0.338] inside ±0.5: TOST p = 0.005
    (0.3, "**inconclusive**"),   # 0.338 > 0.3, and the 95% CI [0.073, 0.377] is not wholly outside
    (0.05, "**not supported**"),  # the 95% CI [0.073, 0.377] lies wholly above 0.05
])
def test_equivalence_claim_by_tost_known_answers(margin, verdict):
    from statsmodels.stats.weightstats import ttost_ind, ttost_paired

    diff = paired_difference(POOL_G, POOL_L)
    se = float(diff.se)
    p = max(sps.t.sf((0.225 + margin) / se, 3), sps.t.cdf((0.225 - margin) / se, 3))
    eq = equivalence(diff, margin)
    assert eq.p == pytest.approx(p)
    assert eq.p == pytest.approx(ttost_paired(np.array(POOL_G), np.array(POOL_L), -margin, margin)[0])
    half90 = sps.t.ppf(0.95, 3) * se
    assert (eq.low, eq.high) == pytest.approx((0.225 - half90, 0.225 + half90))  # [0.112, 0.338]
    assert (eq.p < 0.05) == (-margin < eq.low and eq.high < margin)  # TOST = the 90% interval inside ±margin
    welch = equivalence(welch_difference(POOL_G, POOL_L), margin)
    assert welch.p == pytest.approx(ttost_ind(np.array(POOL_G), np.array(POOL_L), -margin, margin,
                                              usevar="unequal")[0])
    stats_, values = _by_seed(POOL_G, POOL_L)
    text = claim_verdict({**EQUIV, "claim.margin": str(margin)}, stats_, {}, values)
    assert text.startswith(verdict + ":"), text
    assert (f"claim of no difference, |pool=avg − pool=max| < margin {margin:g}: TOST p = {_fmt(p)} (the larger of "
            "the two one-sided p's), 90% CI of the difference [0.112, 0.338]") in text
    assert "95% CI [0.073, 0.377]" in text and "pool=avg 0.388 ± 0.164 (n=4)" in text


def _fmt(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def test_equivalence_of_nearly_equal_variants_is_supported_unpaired_too():
    g, l_ = (0.30, 0.31, 0.29, 0.30), (0.30, 0.29, 0.31, 0.30)
    stats_, values = _by_seed(g, l_, mx_seeds=(2000, 2001, 2002, 2003))
    text = claim_verdict({**EQUIV, "claim.margin": "0.05"}, stats_, {}, values)
    assert text.startswith("**supported**") and "unpaired (Welch's t" in text
    assert verdict_kind(text) == "supported"


def test_claim_on_a_variant_without_runs_is_inconclusive():
    stats = {"pool=avg": {"ssim_nn_train_mean": MeanCI(0.3, 0.25, 0.35, 3)}}
    assert claim_verdict(PARAMS, stats, {}, {}).startswith("**inconclusive**: avg leaks more than max: variant pool=max")
    assert claim_verdict({**PARAMS, "claim.metric": "None"}, stats, {}, {}).startswith("No claim")


@pytest.mark.parametrize("empty", ["pool=avg", "pool=max"])
def test_claim_on_a_variant_whose_runs_were_all_excluded_says_so(empty):
    # every run of one side ended abnormally: mean_ci of no values is (nan, nan, nan, 0)
    stats = {"pool=avg": {"ssim_nn_train_mean": MeanCI(0.3, 0.25, 0.35, 3)},
             "pool=max": {"ssim_nn_train_mean": MeanCI(0.1, 0.05, 0.15, 3)}}
    stats[empty] = {"ssim_nn_train_mean": mean_ci([float("nan"), float("nan")])}
    text = claim_verdict(PARAMS, stats, {}, {})
    assert text == ("**inconclusive**: avg leaks more than max: no run of variant " + empty + " was averaged on "
                    "ssim_nn_train_mean (none ended normally with a finite loss and a recorded value; see Per seed "
                    "for why each was left out).")
    ref = claim_verdict({**PARAMS, "claim.lesser": "None", "claim.reference": "ref_blank_ssim"},
                        {"pool=avg": {"ssim_nn_train_mean": mean_ci([])}}, {"pool=avg": {"ref_blank_ssim": 0.25}}, {})
    assert "no run of variant pool=avg was averaged" in ref


REF_PARAMS = {**PARAMS, "claim.lesser": "None", "claim.reference": "ref_blank_ssim",
              "claim.statement": "the inversions beat the all-black image"}
# each variant has its own reference point (e.g. two datasets); their mean 0.35 must not be used
REFS = {"pool=avg": {"ref_blank_ssim": 0.25}, "pool=max": {"ref_blank_ssim": 0.45}}


@pytest.mark.parametrize("greater, interval, verdict", [
    ("pool=avg", (0.33, 0.31, 0.35), "**supported**"),      # above its own 0.25
    ("pool=max", (0.33, 0.31, 0.35), "**not supported**"),  # below its own 0.45
    ("pool=avg", (0.26, 0.20, 0.32), "**inconclusive**"),   # contains 0.25
])
def test_claim_against_the_variants_own_reference(greater, interval, verdict):
    stats = {greater: {"ssim_nn_train_mean": MeanCI(*interval, 3)}}
    text = claim_verdict({**REF_PARAMS, "claim.greater": greater}, stats, REFS, {})
    assert text.startswith(verdict + ":"), text
    assert f"{REFS[greater]['ref_blank_ssim']:.3f}" in text


def test_claim_against_a_missing_reference_is_inconclusive():
    stats = {"pool=avg": {"ssim_nn_train_mean": MeanCI(0.9, 0.85, 0.95, 3)}}
    assert claim_verdict({**REF_PARAMS, "claim.greater": "pool=avg"}, stats, {}, {}).startswith("**inconclusive**")


def test_yardstick_places_each_variant_against_its_own_references():
    stats = {"train_size=500": {"ssim_nn_train_mean": MeanCI(0.30, 0.2, 0.4, 3)},
             "train_size=10000": {"ssim_nn_train_mean": MeanCI(0.30, 0.2, 0.4, 3)}}
    refs = {"train_size=500": {"ref_blank_ssim": 0.25, "ref_classmean_ssim": 0.40},
            "train_size=10000": {"ref_blank_ssim": 0.35, "ref_classmean_ssim": 0.45}}
    text = yardstick(stats, refs)
    assert "train_size=500 0.300 (above its all-black image, below its class-mean image" in text
    assert "train_size=10000 0.300 (below its all-black image" in text
    assert "No variant beats" not in text


def test_yardstick_does_not_call_a_per_image_claim_a_failure_of_the_mean():
    stats = {"a": {"ssim_nn_train_mean": MeanCI(0.10, 0.05, 0.15, 3)}}
    refs = {"a": {"ref_blank_ssim": 0.20, "ref_classmean_ssim": 0.40}}
    assert "the verdict compares failures" in yardstick(stats, refs, "ssim_nn_train_mean")
    per_image = yardstick(stats, refs, "coverage_gap")
    assert "judged per image (coverage_gap)" in per_image and "compares failures" not in per_image


def test_control_reading_of_each_pair_of_verdicts():
    assert verdict_kind("**supported**: a. b") == "supported"
    assert verdict_kind("**not supported** (the opposite holds): a") == "not supported"
    assert verdict_kind("**inconclusive**: a") == "inconclusive"
    assert verdict_kind("No claim is attached to this study") == "none"
    assert control_reading("supported", "supported").startswith("Both inversions show it: the difference lies in the classifiers")
    assert control_reading("supported", "inconclusive").startswith("Only the generator shows it")
    assert control_reading("inconclusive", "supported").startswith("The classifiers differ")
    assert control_reading("inconclusive", "inconclusive").startswith("Both inversions agree (inconclusive)")
    assert control_reading("supported", "not supported").startswith("The two inversions disagree")
    # a claim against a reference point: whether each inversion beats it
    assert control_reading("supported", "inconclusive", True).startswith("Only the generator beats the reference")
    assert control_reading("not supported", "supported", True).startswith("The direct inversion of the same classifiers beats")
    assert control_reading("inconclusive", "inconclusive", True).startswith("Both inversions agree (inconclusive)")


# -- claims on a 0/1 metric: counts by Fisher's exact test ------------------------------------
COLLAPSE = {"claim.metric": "collapsed", "claim.statement": "pert stabilises", "claim.greater": "pert=0.0",
            "claim.lesser": "pert=1.0", "claim.reference": "None"}


@pytest.mark.parametrize("without, with_, verdict, p", [
    # 6 of 6 against 0 of 6: p = 1 / C(12, 6) = 1/924
    ((6, 6), (0, 6), "**supported**", "p = 0.001"),
    # 3 of 3 against 0 of 3: p = 1 / C(6, 3) = 0.05, not below 0.05 (the zero-width t-intervals would separate)
    ((3, 3), (0, 3), "**inconclusive**", "p = 0.050"),
    ((0, 6), (6, 6), "**not supported** (the opposite holds)", "p = 1.000; the reverse p = 0.001"),
    ((0, 3), (0, 3), "**inconclusive**", "p = 1.000"),
])
def test_claim_on_collapse_counts_uses_fishers_exact_test(without, with_, verdict, p):
    def stat(k, n):
        return {"collapsed": mean_ci([1.0] * k + [0.0] * (n - k))}
    text = claim_verdict(COLLAPSE, {"pert=0.0": stat(*without), "pert=1.0": stat(*with_)}, {}, {})
    assert text.startswith(verdict + ":") or text.startswith(verdict + " "), text
    assert f"collapsed: pert=0.0 {without[0]} of {without[1]} vs pert=1.0 {with_[0]} of {with_[1]}" in text
    assert p in text


def test_claim_on_collapse_without_values_is_inconclusive():
    stats = {"pert=0.0": {"collapsed": mean_ci([1.0, 0.0])}, "pert=1.0": {"collapsed": mean_ci([None, float("nan")])}}
    assert claim_verdict(COLLAPSE, stats, {}, {}) == ("**inconclusive**: pert stabilises: no run of variant pert=1.0 was "
                                                  "averaged on collapsed (none ended normally with a finite loss and "
                                                  "a recorded value; see Per seed for why each was left out).")


@pytest.mark.parametrize("n1, n2, smallest, decidable", [
    (3, 3, "0.050", False),  # 1 / C(6, 3) = 1/20: p < 0.05 is out of reach
    (4, 4, "0.014", True),   # 1 / C(8, 4) = 1/70
    (6, 6, "0.001", True),   # 1 / C(12, 6) = 1/924
    (3, 4, "0.029", True),   # 1 / C(7, 3) = 1/35
])
def test_count_verdict_states_the_smallest_attainable_p(n1, n2, smallest, decidable):
    # no run collapsed on either side: inconclusive, whatever the seeds
    stats = {"pert=0.0": {"collapsed": mean_ci([0.0] * n1)}, "pert=1.0": {"collapsed": mean_ci([0.0] * n2)}}
    text = claim_verdict(COLLAPSE, stats, {}, {})
    assert text.startswith("**inconclusive**")
    assert f"smallest attainable one-sided p with {n1} and {n2} runs: {smallest})" in text
    assert ("no counts of this many runs could: it takes more seeds" in text) == (not decidable)


def _run(status, **metrics):
    return SimpleNamespace(info=SimpleNamespace(status=status), data=SimpleNamespace(metrics=metrics))


def test_averaged_runs_keep_only_runs_that_ended_normally_with_a_finite_loss():
    runs = [_run("FINISHED", nonfinite=0.0), _run("FAILED"), _run("RUNNING"),
            _run("KILLED", nonfinite=1.0, collapsed=1.0), _run("KILLED", nonfinite=0.0), _run("FINISHED")]
    assert averaged_runs(runs) == [runs[0], runs[5]]
    assert [exclusion(r) for r in runs] == ["", "failed", "still running", "loss non-finite", "stopped early", ""]


def test_verdicts_import_no_mlflow_and_no_matplotlib():
    code = "import sys, harness.report.verdicts; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=120).stdout.split())
    assert not {"mlflow", "matplotlib", "torch", "ray"} & loaded


ABOVE = {"claim.statement": "MLPs leak", "claim.metric": "coverage_gap", "claim.greater": "arch=mlp",
         "claim.lesser": "None", "claim.reference": "None", "claim.above": "0.0"}


@pytest.mark.parametrize("gaps, verdict, p", [
    # eight seeds, every gap above 0: the one-sample rule on gap − 0, sign-flip p 2/256
    ((0.2, 0.3, 0.3, 0.1) * 2, "**supported**", "0.008"),
    # the same four seeds: the t-interval [0.073, 0.377] lies above 0, but 4 pairs cannot reach p < 0.05
    ((0.2, 0.3, 0.3, 0.1), "**inconclusive**", "0.125"),
    # gaps around 0: no verdict
    ((0.1, -0.1, 0.05, -0.05, 0.0, 0.02, -0.03, 0.01), "**inconclusive**", None),
])
def test_claim_above_a_value_is_the_paired_rule_on_the_gap(gaps, verdict, p):
    seeds = range(1000, 1000 + len(gaps))
    stats_ = {"arch=mlp": {"coverage_gap": mean_ci(gaps)}}
    text = claim_verdict(ABOVE, stats_, {}, {"arch=mlp": list(zip(seeds, gaps))})
    assert text.startswith(verdict + ":"), text
    assert f"coverage_gap: arch=mlp {mean_ci(gaps).mean:.3f}" in text and "vs value 0.000" in text
    assert f"difference arch=mlp − 0 paired by seed over {len(gaps)} seeds" in text
    if p:
        assert f"sign-flip permutation p = {p}" in text
    if len(gaps) == 4:  # the known interval of the pooling example's differences
        assert "mean 0.225, 95% CI [0.073, 0.377]" in text


def test_a_claim_above_a_value_compares_the_other_variants_without_a_verdict():
    from harness.report.verdicts import comparisons
    seeds = range(1000, 1008)
    values = {"arch=mlp": list(zip(seeds, (0.3, 0.5, 0.45, 0.3) * 2)), "arch=cnn": list(zip(seeds, (0.1, 0.2, 0.15, 0.2) * 2))}
    lines = comparisons(ABOVE, values)
    # cnn − mlp per seed: -0.2, -0.3, -0.3, -0.1 twice: mean -0.225, 95% CI [-0.299, -0.151], p = 2/256
    assert lines == [lines[0]] and lines[0].startswith("Compared (no claim): coverage_gap arch=cnn against arch=mlp, "
                                                        "difference arch=cnn − arch=mlp paired by seed over 8 seeds")
    assert "mean -0.225, 95% CI [-0.299, -0.151]" in lines[0] and "p = 0.008" in lines[0]
    assert "supported" not in lines[0]
    assert comparisons(PARAMS, values) == []  # a claim between two variants: the verdict is the comparison


def test_a_leave_one_out_claim_compares_each_other_removal_with_the_full_set():
    from harness.report.verdicts import comparisons
    seeds = range(1000, 1008)
    params = {"claim.statement": "kkt makes it leak", "claim.metric": "coverage_gap", "claim.greater": "full",
              "claim.lesser": "no_kkt", "claim.reference": "None", "claim.above": "None"}
    values = {"full": list(zip(seeds, (0.3, 0.5, 0.45, 0.3) * 2)), "no_kkt": list(zip(seeds, (0.0,) * 8)),
              "no_ce": list(zip(seeds, (0.1, 0.2, 0.15, 0.2) * 2)), "no_tv": list(zip(seeds, (0.3, 0.5, 0.45, 0.3) * 2))}
    lines = comparisons(params, values)
    # the claim's two variants get the verdict, not a comparison; the others in name order
    assert [line.split(",")[0] for line in lines] == ["Compared (no claim): coverage_gap no_ce against full",
                                                       "Compared (no claim): coverage_gap no_tv against full"]
    # no_ce − full per seed: -0.2, -0.3, -0.3, -0.1 twice: mean -0.225, 95% CI [-0.299, -0.151], p = 2/256
    assert "mean -0.225, 95% CI [-0.299, -0.151]" in lines[0] and "p = 0.008" in lines[0]
    # no_tv equals full at every seed: no difference, every sign pattern ties (p = 1)
    assert "mean 0.000" in lines[1] and "p = 1.000" in lines[1]
    reference = dict(params, **{"claim.lesser": "None", "claim.reference": "ref_blank_ssim"})
    assert comparisons(reference, values) == []
