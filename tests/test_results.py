"""Known answers for the decision logic: the confidence interval, the best-trial rule and the
claim verdict, on fixed numbers (no Ray, no MLflow, no torch)."""
import math

import pytest

from harness.report import claim_verdict, yardstick
from harness.results import MeanCI, best_trials, mean_ci


# -- mean_ci: Student t, values from scipy.stats.t.interval(0.95, n - 1, loc=mean, scale=sem) --
@pytest.mark.parametrize("values, mean, low, high", [
    ([1, 2, 3, 4], 2.5, 0.4457397432394794, 4.554260256760521),
    ([0.2, 0.25, 0.3], 0.25, 0.12579311441248353, 0.37420688558751647),
    ([0.5, 0.7], 0.6, -0.6706204736174691, 1.870620473617469),
])
def test_mean_ci_is_students_t_interval(values, mean, low, high):
    got = mean_ci(values)
    assert got.mean == pytest.approx(mean, abs=1e-12)
    assert got.low == pytest.approx(low, abs=1e-9) and got.high == pytest.approx(high, abs=1e-9)
    assert got.n == len(values)


def test_mean_ci_counts_only_the_values_it_averages():
    got = mean_ci([1, float("nan"), 2, None, 3, float("inf"), 4])
    assert got.n == 4 and got.mean == 2.5
    assert (got.high - got.low) / 2 == pytest.approx(2.0542602567605206, abs=1e-9)
    single = mean_ci([0.3, float("nan")])
    assert single == (0.3, -math.inf, math.inf, 1)
    empty = mean_ci([float("nan")])
    assert empty.n == 0 and math.isnan(empty.mean)


# -- the one best-trial rule ------------------------------------------------------------------
def _trial(name, score, failed=False, nonfinite=0.0):
    return {"name": name, "failed": failed, "metrics": {"score": score, "nonfinite": nonfinite}}


TRIALS = [
    _trial("failed", 0.9, failed=True),        # FAILED: never best, however high
    _trial("nan_stopped", 0.8, nonfinite=1.0),  # its loss became NaN: never best
    _trial("no_metric", float("nan")),
    _trial("pruned", 0.5),                      # stopped early by ASHA: may be best
    _trial("finished", 0.4),
    _trial("pruned_tie", 0.5),
]


def _best(mode, top=1):
    found = best_trials(TRIALS, "score", mode, top, metrics=lambda t: t["metrics"], failed=lambda t: t["failed"])
    return [t["name"] for t in found]


def test_best_trial_rule():
    assert _best("max") == ["pruned"]
    assert _best("max", top=2) == ["pruned", "pruned_tie"]  # a tie keeps the input order
    assert _best("min") == ["finished"]
    assert _best("max", top=None) == ["pruned", "pruned_tie", "finished"]


def test_sweep_summary_and_ablate_pick_use_the_rule():
    from harness.sweep import VariantOutcome, best_rows

    rows = [{"variant": "v", "config": {"loss.tv": t["metrics"]["score"]}, "metrics": t["metrics"],
             "error": t["failed"], "name": t["name"]} for t in TRIALS]
    outcome = VariantOutcome("v", {}, rows=rows)
    assert [r["name"] for r in best_rows([outcome], "score", "max", top=1)] == ["pruned"]
    assert [r["name"] for r in best_rows([outcome], "score", "min", top=2)] == ["finished", "pruned"]


# -- claim_verdict in every branch --------------------------------------------------------------
PARAMS = {"claim.statement": "avg leaks more than max", "claim.metric": "ssim_nn_train_mean",
          "claim.greater": "pool=avg", "claim.lesser": "pool=max", "claim.reference": "None"}


def _stats(avg, mx):
    return {"pool=avg": {"ssim_nn_train_mean": MeanCI(*avg, 3)}, "pool=max": {"ssim_nn_train_mean": MeanCI(*mx, 3)}}


@pytest.mark.parametrize("avg, mx, verdict", [
    ((0.30, 0.25, 0.35), (0.10, 0.05, 0.15), "**supported**"),
    ((0.10, 0.05, 0.15), (0.30, 0.25, 0.35), "**not supported** (the opposite holds)"),
    # the means differ but the intervals overlap: no verdict either way
    ((0.30, 0.20, 0.40), (0.25, 0.15, 0.35), "**inconclusive**"),
    ((0.25, 0.20, 0.40), (0.30, 0.15, 0.35), "**inconclusive**"),
    # intervals that touch do not separate
    ((0.30, 0.25, 0.35), (0.20, 0.15, 0.25), "**inconclusive**"),
])
def test_claim_between_variants(avg, mx, verdict):
    text = claim_verdict(PARAMS, _stats(avg, mx), {})
    assert text.startswith(verdict + ":") or text.startswith(verdict + " "), text
    assert "n=3" in text


def test_claim_on_a_variant_without_runs_is_inconclusive():
    stats = {"pool=avg": {"ssim_nn_train_mean": MeanCI(0.3, 0.25, 0.35, 3)}}
    assert claim_verdict(PARAMS, stats, {}).startswith("**inconclusive**: avg leaks more than max: variant pool=max")
    assert claim_verdict({**PARAMS, "claim.metric": "None"}, stats, {}).startswith("No claim")


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
    text = claim_verdict({**REF_PARAMS, "claim.greater": greater}, stats, REFS)
    assert text.startswith(verdict + ":"), text
    assert f"{REFS[greater]['ref_blank_ssim']:.3f}" in text


def test_claim_against_a_missing_reference_is_inconclusive():
    stats = {"pool=avg": {"ssim_nn_train_mean": MeanCI(0.9, 0.85, 0.95, 3)}}
    assert claim_verdict({**REF_PARAMS, "claim.greater": "pool=avg"}, stats, {}).startswith("**inconclusive**")


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


def _control_run(seed: int, **metrics):
    from types import SimpleNamespace
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, params={"seed": str(seed), "inverter": "direct"}))


def test_control_reading_of_each_pair_of_verdicts():
    from harness.report import control_reading, verdict_kind
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


def test_control_section_judges_the_claim_on_the_control_runs():
    from harness.report import control_section
    from harness.results import mean_ci
    params = {"claim.metric": "ssim_nn_train_mean", "claim.greater": "pool=avg", "claim.lesser": "pool=max",
              "claim.statement": "avg leaks more"}
    # the study's own (generator) inversions: overlapping -> inconclusive
    stats = {"pool=avg": {"ssim_nn_train_mean": mean_ci([0.30, 0.31, 0.32])},
             "pool=max": {"ssim_nn_train_mean": mean_ci([0.29, 0.31, 0.33])}}
    # the control: avg 0.40 ± t(2)·0.01/√3·... vs max 0.30: the intervals separate
    controlled = {"pool=avg": [_control_run(s, ssim_nn_train_mean=v, collapsed=c)
                               for s, v, c in zip((1000, 1001, 1002), (0.39, 0.40, 0.41), (1.0, 0.0, 0.0))],
                  "pool=max": [_control_run(s, ssim_nn_train_mean=v) for s, v in zip((1000, 1001, 1002), (0.29, 0.30, 0.31))]}
    refs = {v: {"ref_blank_ssim": 0.25, "ref_classmean_ssim": 0.40, "ref_heldout_ssim": 0.49} for v in controlled}
    text = "\n".join(control_section(params, stats, controlled, refs))
    assert "pool=avg: direct inverter, seeds 1000, 1001, 1002" in text
    # mean 0.400, half-width t(0.975, 2) x 0.01 / sqrt(3) = 4.303 x 0.005774 = 0.0248
    assert "| pool=avg | 3 | 0.400 ± 0.025 |" in text
    header = next(line for line in text.splitlines() if line.startswith("| variant |")).split(" | ")
    avg = next(line for line in text.splitlines() if line.startswith("| pool=avg |")).split(" | ")
    assert avg[header.index("collapsed")] == "1 of 3"  # one of the three control runs collapsed
    assert "The claim on the control: **supported**" in text
    assert "The classifiers differ (the direct inversion shows it)" in text
    assert control_section(params, stats, {}, refs) == []


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
    text = claim_verdict(COLLAPSE, {"pert=0.0": stat(*without), "pert=1.0": stat(*with_)}, {})
    assert text.startswith(verdict + ":") or text.startswith(verdict + " "), text
    assert f"collapsed: pert=0.0 {without[0]} of {without[1]} vs pert=1.0 {with_[0]} of {with_[1]}" in text
    assert p in text


def test_claim_on_collapse_without_values_is_inconclusive():
    stats = {"pert=0.0": {"collapsed": mean_ci([1.0, 0.0])}, "pert=1.0": {"collapsed": mean_ci([None, float("nan")])}}
    assert claim_verdict(COLLAPSE, stats, {}) == ("**inconclusive**: pert stabilises: collapsed was not recorded "
                                                  "for pert=1.0.")


def test_sample_sd_and_counts():
    from harness.results import count_at_one, sample_sd
    assert sample_sd([1, 2, 3, 4]) == pytest.approx(1.2909944487358056, abs=1e-12)  # sqrt(5/3)
    assert math.isnan(sample_sd([0.3, float("nan")]))
    assert count_at_one([1.0, 0.0, 1.0, None, float("nan")]) == (2, 3)


def test_per_seed_section_lists_every_run_in_seed_order():
    from types import SimpleNamespace

    from harness.report import per_seed_section

    def run(seed, status="FINISHED", **metrics):
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics, params={"seed": str(seed)}),
                               info=SimpleNamespace(status=status))
    confirmed = {"kkt=1.0": [run(1002, ssim_nn_train_mean=0.30, diversity=0.6, collapsed=0.0),
                             run(1000, ssim_nn_train_mean=0.20, diversity=0.4, collapsed=1.0),
                             run(1001, status="FAILED")],
                 "kkt=0.0": [run(1000, ssim_nn_train_mean=0.26, diversity=0.5, collapsed=0.0)]}
    refs = {"kkt=1.0": {"ref_blank_ssim": 0.25}}  # kkt=0.0 has no reference points
    text = "\n".join(per_seed_section(confirmed, refs, "diversity"))
    rows = [line for line in text.splitlines() if line.startswith("| kkt=")]
    assert [r.split(" | ")[1] for r in rows] == ["1000", "1000", "1001 (failed)", "1002"]
    assert rows[1] == "| kkt=1.0 | 1000 | 0.200 | 0.400 | n/a | yes | n/a | n/a | n/a |"
    assert rows[2] == "| kkt=1.0 | 1001 (failed) | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"
    # sd of (0.20, 0.30) = 0.0707, of (0.4, 0.6) = 0.1414; one value: no sd; no reference: no count
    assert ("Spread over seeds (sample sd): kkt=0.0: ssim_nn_train_mean sd n/a over 1 seeds, n/a (no all-black "
            "reference) below its all-black image, diversity sd n/a; kkt=1.0: ssim_nn_train_mean sd 0.071 over "
            "2 seeds, 1 below its all-black image, diversity sd 0.141.") in text
