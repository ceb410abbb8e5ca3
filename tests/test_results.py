"""Known answers for the decision logic: the confidence interval, the best-trial rule and which
runs are averaged, on fixed numbers (no Ray, no MLflow, no torch). The verdicts built on them:
tests/test_verdicts.py."""
import math

import pytest

from harness.records.results import best_trials, enters_averages, mean_ci


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


def _at(name, score, epoch):
    return {"name": name, "failed": False, "metrics": {"score": score, "nonfinite": 0.0, "epoch": epoch}}


def test_best_trial_is_ranked_at_equal_budget():
    # the positive control's tuning: ASHA stopped five of six trials at rungs 4 and 8 with values
    # measured at a third or two thirds of the budget; the one trial that ran all 12 epochs is the
    # only one measured at the full budget, and leads whatever the others' truncated values
    asha = [_at("rung4_high", 0.52, 4), _at("finished", 0.30, 12), _at("rung8", 0.45, 8),
            _at("rung4_low", 0.10, 4), _at("finished_worse", 0.20, 12), _at("rung8_best", 0.48, 8)]
    ranked = [t["name"] for t in best_trials(asha, "score", "max", None, metrics=lambda t: t["metrics"],
                                             failed=lambda t: t["failed"])]
    assert ranked == ["finished", "finished_worse", "rung8_best", "rung8", "rung4_high", "rung4_low"]
    lowest = best_trials(asha, "score", "min", 2, metrics=lambda t: t["metrics"], failed=lambda t: t["failed"])
    assert [t["name"] for t in lowest] == ["finished_worse", "finished"]
    # a trial that recorded no epoch counts as budget 0, behind every trial that did
    assert best_trials([_trial("no_epoch", 0.9), _at("one_epoch", 0.1, 1)], "score", "max",
                       metrics=lambda t: t["metrics"], failed=lambda t: t["failed"])[0]["name"] == "one_epoch"


def test_sweep_summary_and_ablate_pick_use_the_rule():
    from harness.sweep.tune import VariantOutcome, best_rows

    rows = [{"variant": "v", "config": {"loss.tv": t["metrics"]["score"]}, "metrics": t["metrics"],
             "error": t["failed"], "name": t["name"]} for t in TRIALS]
    outcome = VariantOutcome("v", {}, rows=rows)
    assert [r["name"] for r in best_rows([outcome], "score", "max", top=1)] == ["pruned"]
    assert [r["name"] for r in best_rows([outcome], "score", "min", top=2)] == ["finished", "pruned"]


def test_sample_sd_and_counts():
    from harness.records.results import count_at_one, sample_sd
    assert sample_sd([1, 2, 3, 4]) == pytest.approx(1.2909944487358056, abs=1e-12)  # sqrt(5/3)
    assert math.isnan(sample_sd([0.3, float("nan")]))
    assert count_at_one([1.0, 0.0, 1.0, None, float("nan")]) == (2, 3)


# -- which runs are averaged: one rule for the report (MLflow statuses) and summary.json (outcomes) --
@pytest.mark.parametrize("status, metrics, expected", [
    ("FINISHED", {"nonfinite": 0.0}, (True, "")),
    ("FINISHED", {}, (True, "")),
    ("FAILED", {"nonfinite": 0.0}, (False, "failed")),
    ("RUNNING", {}, (False, "still running")),
    # a NaN loss stops the run (KILLED) and logs collapsed = 1: neither averaged nor a collapse
    ("KILLED", {"nonfinite": 1.0, "collapsed": 1.0}, (False, "loss non-finite")),
    ("KILLED", {"nonfinite": 0.0}, (False, "stopped early")),
    ("finished", {"nonfinite": 0.0}, (True, "")),
    ("finished", {"nonfinite": 1.0}, (False, "loss non-finite")),
    ("failed", {}, (False, "failed")),
    ("nonfinite", {"nonfinite": 1.0}, (False, "loss non-finite")),
    ("pruned", {}, (False, "stopped early")),
    ("collapsed", {}, (False, "stopped early")),
    ("interrupted", {}, (False, "interrupted")),
])
def test_which_runs_enter_the_averages(status, metrics, expected):
    assert enters_averages(status, metrics) == expected


def test_summary_json_mean_averages_the_runs_the_report_averages():
    from harness.sweep.tune import VariantOutcome, variant_summary

    def row(outcome, score, nonfinite=0.0):
        return {"variant": "v", "trial_id": f"t{score}", "config": {}, "error": outcome == "failed",
                "outcome": outcome, "run_id": None, "optuna_trial": None,
                "metrics": {"score": score, "nonfinite": nonfinite}}
    # seeds 0.02 and 0.03 finished; 0.60 failed; a NaN-stopped run; and a row called finished whose
    # last result still says the loss was non-finite: only 0.02 and 0.03 are averaged, mean 0.025
    rows = [row("finished", 0.02), row("finished", 0.03), row("failed", 0.60), row("nonfinite", 0.0, 1.0),
            row("finished", 0.90, 1.0)]
    summary = variant_summary(VariantOutcome("v", {}, rows=rows, phase="confirm"), "score", "max")
    assert summary["mean_score_finished"] == pytest.approx(0.025, abs=1e-12)
    # the MLflow status the tracking callback gives each outcome is read the same way by the report
    status = {"finished": "FINISHED", "failed": "FAILED", "nonfinite": "KILLED"}
    assert [enters_averages(status[r["outcome"]], r["metrics"]) for r in rows] == \
        [enters_averages(r["outcome"], r["metrics"]) for r in rows]


def test_summary_json_counts_collapses_as_the_report_does():
    from harness.records.results import enters_counts
    from harness.sweep.tune import VariantOutcome, variant_summary

    def row(outcome, collapsed, nonfinite=0.0):
        return {"variant": "v", "trial_id": f"t{outcome}{collapsed}", "config": {}, "error": outcome == "failed",
                "outcome": outcome, "run_id": None, "optuna_trial": None,
                "metrics": {"collapsed": collapsed, "nonfinite": nonfinite, "score": 0.1}}
    # 1 finished at 0, 2 stopped by the collapse stopper (1), 1 pruned (1, a shorter budget), 1 NaN (1):
    # the count is over the finished and the collapse-stopped trials, 2 of 3
    rows = [row("finished", 0.0), row("collapsed", 1.0), row("collapsed", 1.0), row("pruned", 1.0),
            row("nonfinite", 1.0, 1.0)]
    summary = variant_summary(VariantOutcome("v", {}, rows=rows, phase="tune"), "collapsed", "min")
    assert summary["mean_collapsed_finished"] == pytest.approx(2 / 3)
    assert [enters_counts(r["outcome"], r["metrics"]) for r in rows] == [True, True, True, False, False]
    assert enters_counts("KILLED", {"collapsed": 1.0}, "collapsed") and not enters_counts("KILLED", {}, "pruned")


def test_tied_trials_go_to_the_one_that_started_first_in_the_sweep_and_in_the_report():
    """Six trials all at coverage_gap 0 (the loss-design search): the sweep's summary read them in
    the order Ray created them and picked the first, the report read MLflow's newest-first order
    and picked the last. Both now pick the trial that started first."""
    import types

    from harness.report.sections import best_runs
    from harness.sweep.tune import VariantOutcome, best_rows

    rows = [{"variant": "all", "config": {}, "metrics": {"coverage_gap": 0.0, "epoch": 4, "nonfinite": 0.0},
             "error": False, "name": f"t{n}"} for n in range(6)]  # as Ray created them
    assert [r["name"] for r in best_rows([VariantOutcome("all", {}, rows=rows)], "coverage_gap", "max", top=2)] \
        == ["t0", "t1"]
    runs = [types.SimpleNamespace(info=types.SimpleNamespace(status="FINISHED", start_time=1000 + n), name=f"t{n}",
                                  data=types.SimpleNamespace(metrics={"coverage_gap": 0.0, "epoch": 4, "nonfinite": 0.0},
                                                             tags={}))
            for n in (5, 4, 3, 2, 1, 0)]  # MLflow's order: newest first
    assert [r.name for r in best_runs(runs, {"metric": "coverage_gap", "mode": "max"}, top=2)] == ["t0", "t1"]
    # a better value still wins over an earlier start
    runs[1].data.metrics = {**runs[1].data.metrics, "coverage_gap": 0.1}
    assert [r.name for r in best_runs(runs, {"metric": "coverage_gap", "mode": "max"}, top=2)] == ["t4", "t0"]
