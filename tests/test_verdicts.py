"""Known answers for the rules a report decides by (`harness.report.verdicts`), on hand-made numbers and
run records: no MLflow store, no figures."""
import subprocess
import sys
from types import SimpleNamespace

import pytest

from harness.records.results import MeanCI, mean_ci
from harness.report.verdicts import (averaged_runs, claim_verdict, control_reading, exclusion, verdict_kind,
                              yardstick)


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


@pytest.mark.parametrize("empty", ["pool=avg", "pool=max"])
def test_claim_on_a_variant_whose_runs_were_all_excluded_says_so(empty):
    # every run of one side ended abnormally: mean_ci of no values is (nan, nan, nan, 0)
    stats = {"pool=avg": {"ssim_nn_train_mean": MeanCI(0.3, 0.25, 0.35, 3)},
             "pool=max": {"ssim_nn_train_mean": MeanCI(0.1, 0.05, 0.15, 3)}}
    stats[empty] = {"ssim_nn_train_mean": mean_ci([float("nan"), float("nan")])}
    text = claim_verdict(PARAMS, stats, {})
    assert text == ("**inconclusive**: avg leaks more than max: no run of variant " + empty + " was averaged on "
                    "ssim_nn_train_mean (none ended normally with a finite loss and a recorded value; see Per seed "
                    "for why each was left out).")
    ref = claim_verdict({**PARAMS, "claim.lesser": "None", "claim.reference": "ref_blank_ssim"},
                        {"pool=avg": {"ssim_nn_train_mean": mean_ci([])}}, {"pool=avg": {"ref_blank_ssim": 0.25}})
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
    text = claim_verdict(COLLAPSE, {"pert=0.0": stat(*without), "pert=1.0": stat(*with_)}, {})
    assert text.startswith(verdict + ":") or text.startswith(verdict + " "), text
    assert f"collapsed: pert=0.0 {without[0]} of {without[1]} vs pert=1.0 {with_[0]} of {with_[1]}" in text
    assert p in text


def test_claim_on_collapse_without_values_is_inconclusive():
    stats = {"pert=0.0": {"collapsed": mean_ci([1.0, 0.0])}, "pert=1.0": {"collapsed": mean_ci([None, float("nan")])}}
    assert claim_verdict(COLLAPSE, stats, {}) == ("**inconclusive**: pert stabilises: no run of variant pert=1.0 was "
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
    text = claim_verdict(COLLAPSE, stats, {})
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
