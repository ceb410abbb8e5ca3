"""`harness report` on small MLflow stores written by hand with known metrics: every number of
the report is checked against a value worked out in advance (no Ray, no torch)."""
import time

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.report.write import load_study


def _run(client, exp, parent, variant, phase, status, metrics, params=None):
    tags = {"mlflow.parentRunId": parent, "harness.variant": variant, "harness.phase": phase}
    run_id = client.create_run(exp, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 1) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture
def store(tmp_path, fresh_store):
    uri = fresh_store(tmp_path / 'mlflow.db')
    client = MlflowClient(uri)
    exp = client.create_experiment("known", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"harness.kind": "study"}).info.run_id
    params = {"name": "known", "description": "hand-made", "metric": "score", "mode": "max",
              "search.loss.tv.dist": "uniform", "claim.statement": "avg leaks more than max",
              "claim.metric": "ssim_nn_train_mean", "claim.greater": "pool=avg", "claim.lesser": "pool=max",
              "claim.reference": "None", "seeds": "[1000, 1001, 1002]"}
    client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    # the two variants stand for two datasets: their reference points differ
    refs = {"pool=avg": {"ref_heldout_ssim": 0.5, "ref_classmean_ssim": 0.4, "ref_blank_ssim": 0.25,
                         "ref_heldout_diversity": 0.8},
            "pool=max": {"ref_heldout_ssim": 0.6, "ref_classmean_ssim": 0.45, "ref_blank_ssim": 0.35,
                         "ref_heldout_diversity": 0.7}}
    tune = [  # (variant, status, score, nonfinite, loss.tv)
        ("pool=avg", "FAILED", 0.9, 0, 0.1),    # failed: never the best, however high
        ("pool=avg", "KILLED", 0.8, 1, 0.2),    # NaN-stopped: never the best
        ("pool=avg", "KILLED", 0.5, 0, 0.3),    # pruned by ASHA: the best
        ("pool=avg", "FINISHED", 0.4, 0, 0.4),
        ("pool=max", "FINISHED", 0.2, 0, 0.5),
    ]
    for variant, status, score, nonfinite, tv in tune:
        _run(client, exp, parent, variant, "tune", status,
             {"score": score, "nonfinite": nonfinite, "ssim_nn_train_mean": 0.1, **refs[variant]},
             {"seed": 0, "classifier.seed": 0, "loss.tv": tv})
    confirm = {"pool=avg": [0.2, 0.25, 0.3, None], "pool=max": [0.05, 0.06, 0.07]}
    for variant, values in confirm.items():
        for i, value in enumerate(values):
            metrics = {"score": 0.1 * (i + 1), "collapsed": float(variant == "pool=avg" and i == 1), **refs[variant]}
            if value is not None:  # the fourth avg run never evaluated: nothing to average
                metrics["ssim_nn_train_mean"] = value
            _run(client, exp, parent, variant, "confirm", "FINISHED", metrics,
                 {"seed": 1000 + i, "classifier.seed": 1000 + i, "loss.tv": 0.3})
    client.set_terminated(parent, "FINISHED")
    return uri, tmp_path


def _row(text: str, first_cell: str, after: str = "") -> list[str]:
    body = text.split(after, 1)[1] if after else text
    line = next(l for l in body.splitlines() if l.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_numbers_match_hand_computed_values(store):
    uri, tmp = store
    out = tmp / "report"
    assert main(["report", "--experiment", "known", "--mlflow-uri", uri, "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    header = _row(text, "variant", "## Variants")
    avg = dict(zip(header, _row(text, "pool=avg", "## Variants")))
    mx = dict(zip(header, _row(text, "pool=max", "## Variants")))
    # avg: four runs, three with an nn-SSIM (0.2, 0.25, 0.3): t-interval half-width 0.124
    assert avg["n"] == "4" and avg["ssim_nn_train_mean"] == "0.250 ± 0.124 (n=3)"
    assert avg["score"] == "0.250 ± 0.205"  # 0.1..0.4: mean 0.25, sd 0.129, t(3) 3.182
    assert mx["n"] == "3" and mx["ssim_nn_train_mean"] == "0.060 ± 0.025"  # sd 0.01, t(2) 4.303
    # the intervals [0.126, 0.374] and [0.035, 0.085] separate, and so does the paired difference's
    # ([0.091, 0.289] over the 3 seeds both averaged), but 3 pairs cannot reach a sign-flip p below 2/8: no verdict
    assert "**inconclusive**: avg leaks more than max." in text
    assert "sign-flip permutation p = 0.250" in text and "so it takes at least 6 seeds" in text
    assert "pool=avg 0.250 ± 0.124 (n=3) vs pool=max 0.060 ± 0.025 (n=3)" in text
    # reference points per variant, never averaged across the two
    refs_header = _row(text, "variant", "Reference points of each variant")
    assert dict(zip(refs_header, _row(text, "pool=avg", "Reference points of each variant")))["ref_blank_ssim"] == "0.250"
    assert dict(zip(refs_header, _row(text, "pool=max", "Reference points of each variant")))["ref_blank_ssim"] == "0.350"
    assert "pool=max 0.060 (below its all-black image; all-black 0.350" in text
    # tuning: the best is the pruned 0.5 (not the failed 0.9, not the NaN-stopped 0.8)
    tuning = _row(text, "pool=avg", "## Tuning")
    assert tuning == ["pool=avg", "4", "1", "2", "1", "0.500", "loss.tv=0.3"]
    assert _row(text, "variant", "## Tuning")[5] == "best score"
    # what the sampler did: no tpe_startup_trials logged -> Optuna's 10; 4 and 1 trials: all random
    assert ("Sampler: seeded TPE, the first 10 trials of each variant drawn at random (its start-up phase), "
            "trials run all at once. pool=avg: 4 random start-up, 0 from TPE; pool=max: 1 random start-up, "
            "0 from TPE. No TPE trial had an ended trial to model: this search was random.") in text
    # seeds: which ones confirmed, and that they are not the tuning seed
    assert "Tuning trials ran with seeds 0" in text
    assert "- pool=avg: seeds 1000, 1001, 1002, 1003" in text and "- pool=max: seeds 1000, 1001, 1002" in text
    assert "The confirmation seeds are disjoint from the tuning seeds." in text
    # collapsed is a count of runs, not a t-interval over 0/1 values
    assert avg["collapsed"] == "1 of 4" and mx["collapsed"] == "0 of 3"
    # every confirmation run on its own line, and the spread over seeds
    seed_header = _row(text, "variant", "## Per seed")
    row = dict(zip(seed_header, _row(text, "pool=avg | 1001", "## Per seed")))
    assert row["ssim_nn_train_mean"] == "0.250" and row["collapsed"] == "yes" and row["evaluator_acc"] == "n/a"
    assert dict(zip(seed_header, _row(text, "pool=avg | 1003", "## Per seed")))["ssim_nn_train_mean"] == "n/a"
    # sd of (0.2, 0.25, 0.3) = 0.05; of (0.05, 0.06, 0.07) = 0.01; below all-black: 0.2 < 0.25 (0.25 is not),
    # and all three max runs below their 0.35
    assert ("Spread over seeds (sample sd): pool=avg: ssim_nn_train_mean sd 0.050 over 3 seeds, 1 below its all-black "
            "image; pool=max: ssim_nn_train_mean sd 0.010 over 3 seeds, 3 below its all-black image.") in text


def test_report_flags_confirmation_seeds_that_repeat_a_tuning_seed(store, tmp_path):
    uri, _ = store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("known").experiment_id
    parent = client.search_runs([exp], "tags.`harness.kind` = 'study'")[0].info.run_id
    _run(client, exp, parent, "pool=max", "confirm", "FINISHED", {"score": 0.1, "ssim_nn_train_mean": 0.06},
         {"seed": 0, "classifier.seed": 0})
    assert main(["report", "--experiment", "known", "--mlflow-uri", uri, "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "README.md").read_text()
    assert "Confirmation seeds overlap the tuning seeds (0)" in text


@pytest.fixture
def sqlite_without_fsync():
    """SQLite connections opened during the test skip the fsync of each commit (PRAGMA synchronous = OFF):
    the store is written and read back by this process alone, and writing it is 1,051 commits."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def no_fsync(connection, _record):
        connection.execute("PRAGMA synchronous = OFF")
    event.listen(Engine, "connect", no_fsync)
    yield
    event.remove(Engine, "connect", no_fsync)


def test_load_study_finds_its_parent_beyond_the_newest_thousand_runs(tmp_path, fresh_store, sqlite_without_fsync):
    """A study with more trials than one search page: the parent is the oldest run."""
    uri = fresh_store(tmp_path / 'big.db')
    client = MlflowClient(uri)
    exp = client.create_experiment("big", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"harness.kind": "study"}).info.run_id
    n = 1050
    tags = [RunTag("mlflow.parentRunId", parent)]
    for _ in range(n):
        client.create_run(exp, tags={t.key: t.value for t in tags})
    _, found, children = load_study("big", uri)
    assert found.info.run_id == parent
    assert len(children) == n and len({c.info.run_id for c in children}) == n


def test_tpe_history_counts_what_each_tpe_trial_could_model():
    from harness.report.sections import tpe_history
    # (start, end): two start-up trials, then three TPE trials starting at 6, 11 and 12
    spans = [(11, 30), (0, 10), (6, 20), (1, 5), (12, None)]
    assert tpe_history(spans, startup=2) == (2, [1, 2, 2])
    assert tpe_history(spans, startup=10) == (5, [])


def _study(tmp_path, name: str, params: dict, runs: list[tuple], fresh_store) -> str:
    """A hand-made study store: `runs` are (variant, seed, status, metrics[, artifact folder])
    confirmation runs under one parent with `params`."""
    uri = fresh_store(tmp_path / 'mlflow.db')
    client = MlflowClient(uri)
    exp = client.create_experiment(name, artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"harness.kind": "study"}).info.run_id
    client.log_batch(parent, params=[Param(k, v) for k, v in {"name": name, "metric": "score", "mode": "max",
                                                              **params}.items()])
    for variant, seed, status, metrics, *artifacts in runs:
        run_id = _run(client, exp, parent, variant, "confirm", "RUNNING", metrics,
                      {"seed": seed, "classifier.seed": seed})
        for folder in artifacts:
            client.log_artifacts(run_id, str(folder))
        if status != "RUNNING":
            client.set_terminated(run_id, status)
    client.set_terminated(parent, "FINISHED")
    return uri


def _report(tmp_path, name: str, uri: str) -> str:
    assert main(["report", "--experiment", name, "--mlflow-uri", uri, "--out", str(tmp_path / "report")]) == 0
    return (tmp_path / "report" / "README.md").read_text()


def test_report_averages_only_runs_that_ended_normally(tmp_path, fresh_store):
    claim = {"claim.statement": "avg leaks more than max", "claim.metric": "ssim_nn_train_mean",
             "claim.greater": "pool=avg", "claim.lesser": "pool=max", "claim.reference": "None"}
    runs = [("pool=avg", 1000, "FINISHED", {"ssim_nn_train_mean": 0.02, "nonfinite": 0.0}),
            ("pool=avg", 1001, "FINISHED", {"ssim_nn_train_mean": 0.03, "nonfinite": 0.0}),
            ("pool=avg", 1002, "FAILED", {"ssim_nn_train_mean": 0.60, "nonfinite": 0.0}),  # a partial budget
            ("pool=avg", 1003, "RUNNING", {"ssim_nn_train_mean": 0.90}),
            *[("pool=max", 1000 + i, "FINISHED", {"ssim_nn_train_mean": v}) for i, v in enumerate((0.25, 0.26, 0.27))]]
    text = _report(tmp_path, "ended", _study(tmp_path, "ended", claim, runs, fresh_store))
    # avg over 0.02 and 0.03 only: mean 0.025, half-width t(0.975, 1) x sd / sqrt(2)
    # = 12.706 x 0.00707 / 1.414 = 0.0635; max 0.26, 4.303 x 0.01 / sqrt(3) = 0.0248: the intervals
    # separate the other way (with the failed and running runs avg was 0.388 ± 0.694, n=4)
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert verdict.lstrip().startswith("**not supported** (the opposite holds)")
    assert "pool=avg 0.025 ± 0.064 (n=2) vs pool=max 0.260 ± 0.025 (n=3)" in verdict
    avg = dict(zip(_row(text, "variant", "## Variants"), _row(text, "pool=avg", "## Variants")))
    assert avg["n"] == "2" and avg["ssim_nn_train_mean"] == "0.025 ± 0.064"
    assert ("- pool=avg: seeds 1000, 1001, 1002, 1003 (excluded from the averages: 1002 failed, "
            "1003 still running)") in text
    # the per-seed table still shows them, marked
    per_seed = dict(zip(_row(text, "variant", "## Per seed"), _row(text, "pool=avg | 1002 (excluded: failed)", "## Per seed")))
    assert per_seed["ssim_nn_train_mean"] == "0.600"
    assert _row(text, "pool=avg | 1003 (excluded: still running)", "## Per seed")[2] == "0.900"
    assert "pool=avg: ssim_nn_train_mean sd 0.007 over 2 seeds" in text


def test_a_run_whose_loss_went_nan_is_not_counted_as_a_collapse(tmp_path, fresh_store):
    claim = {"claim.statement": "pert stabilises", "claim.metric": "collapsed", "claim.greater": "pert=0.0",
             "claim.lesser": "pert=1.0", "claim.reference": "None"}
    runs = [*[("pert=0.0", 1000 + i, "FINISHED", {"collapsed": 1.0, "nonfinite": 0.0}) for i in range(3)],
            # the NaN stopper ends the run KILLED and logs score 0 and collapsed 1
            ("pert=0.0", 1003, "KILLED", {"collapsed": 1.0, "nonfinite": 1.0, "score": 0.0}),
            *[("pert=1.0", 1000 + i, "FINISHED", {"collapsed": 0.0, "nonfinite": 0.0}) for i in range(3)]]
    text = _report(tmp_path, "nan", _study(tmp_path, "nan", claim, runs, fresh_store))
    # 3 of 3 vs 0 of 3: p = 1 / C(6, 3) = 0.050, not below 0.05 (counted as 4 of 4, p = 1 / C(7, 4) = 0.029)
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert verdict.lstrip().startswith("**inconclusive**")
    assert ("collapsed: pert=0.0 3 of 3 vs pert=1.0 0 of 3 (Fisher's exact test, one-sided p = 0.050; the reverse "
            "p = 1.000; smallest attainable one-sided p with 3 and 3 runs: 0.050)") in verdict
    assert dict(zip(_row(text, "variant", "## Variants"), _row(text, "pert=0.0", "## Variants")))["collapsed"] == "3 of 3"
    assert "| pert=0.0 | 1003 (excluded: loss non-finite) |" in text


def test_a_sweep_counts_the_runs_its_collapse_stopper_ended(tmp_path, fresh_store):
    """No confirmation phase: the count of collapses is over the tuning trials, where the collapse
    stopper ends a collapsed trial KILLED (outcome collapsed): it is counted, not excluded; a trial
    pruned by ASHA is not."""
    uri = fresh_store(tmp_path / 'mlflow.db')
    client = MlflowClient(uri)
    exp = client.create_experiment("stopped", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"harness.kind": "sweep"}).info.run_id
    params = {"name": "stopped", "metric": "score", "mode": "max", "claim.statement": "pert stabilises",
              "claim.metric": "collapsed", "claim.greater": "pert=0.0", "claim.lesser": "pert=1.0",
              "claim.reference": "None"}
    client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    trials = [("pert=0.0", "FINISHED", "finished", 1.0), ("pert=0.0", "FINISHED", "finished", 1.0),
              ("pert=0.0", "KILLED", "collapsed", 1.0), ("pert=0.0", "KILLED", "collapsed", 1.0),
              ("pert=0.0", "KILLED", "pruned", 1.0),  # ASHA's: a shorter budget, not counted
              *[("pert=1.0", "FINISHED", "finished", 0.0)] * 4]
    for i, (variant, status, outcome, collapsed) in enumerate(trials):
        run_id = _run(client, exp, parent, variant, "tune", status, {"collapsed": collapsed, "score": 0.1},
                      {"seed": 0, "classifier.seed": 0, "loss.tv": 0.1 * i})
        client.set_tag(run_id, "harness.outcome", outcome)
    client.set_terminated(parent, "FINISHED")
    text = _report(tmp_path, "stopped", uri)
    # 4 of 4 vs 0 of 4: p = 1 / C(8, 4) = 0.014 (the stopped runs left out: 2 of 2 vs 0 of 4, p = 0.067)
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert verdict.lstrip().startswith("**supported**")
    assert "collapsed: pert=0.0 4 of 4 vs pert=1.0 0 of 4 (Fisher's exact test, one-sided p = 0.014" in verdict
    assert dict(zip(_row(text, "variant", "## Variants"), _row(text, "pert=0.0", "## Variants")))["collapsed"] == "4 of 4"


def test_median_run_is_the_middle_value():
    from types import SimpleNamespace

    from harness.report.figures import median_run

    def run(value):
        return SimpleNamespace(data=SimpleNamespace(metrics={"m": value}))
    runs = [run(0.9), run(0.1), run(float("nan")), run(0.5)]
    odd = median_run(runs, "m")  # 0.1 0.5 0.9: 0.5 is the median
    assert (odd.run, odd.n, odd.median, odd.other) == (runs[3], 3, 0.5, None)
    even = median_run([*runs, run(0.7)], "m")  # 0.1 0.5 0.7 0.9: the median 0.6 lies between 0.5 and 0.7
    assert even.run is runs[3] and even.n == 4 and even.median == pytest.approx(0.6)
    assert even.other.data.metrics["m"] == 0.7
    assert median_run([run(None)], "m") is None


def test_one_run_figures_pick_the_median_by_a_graded_metric():
    from harness.report.figures import figure_metric
    assert figure_metric({"claim.metric": "coverage_gap", "metric": "score"}) == "coverage_gap"
    # a count claim (0/1 per run) cannot rank seeds: the study's search metric does
    assert figure_metric({"claim.metric": "collapsed", "metric": "ssim_nn_train_mean"}) == "ssim_nn_train_mean"
    assert figure_metric({"claim.metric": "collapsed", "metric": "collapsed"}) == "score"
    assert figure_metric({"claim.metric": "None", "metric": "diversity"}) == "diversity"
    assert figure_metric({}) == "score"


def test_coverage_figure_draws_the_bars_the_runs_counted_at():
    from types import SimpleNamespace

    from harness.report.figures import coverage_bars

    def run(**params):
        return SimpleNamespace(data=SimpleNamespace(params=params))
    basis = {"a": [run(**{"eval.recon_threshold": "0.45", "eval.strict_threshold": "0.6"})],
             "b": [run(**{"eval.recon_threshold": "0.45", "eval.strict_threshold": "0.6"})]}
    assert coverage_bars(basis) == [0.45, 0.6]
    assert coverage_bars({"a": [run()]}) == [0.4, 0.5]  # runs logged before the bars: the defaults


def test_figures_show_the_median_seed_by_the_claims_metric(tmp_path, fresh_store):
    import matplotlib.pyplot as plt
    import numpy as np

    claim = {"claim.statement": "the inversions beat the all-black image", "claim.metric": "ssim_nn_train_mean",
             "claim.greater": "all", "claim.lesser": "None", "claim.reference": "ref_blank_ssim"}
    runs = []
    # by the claim's metric the median is seed 1002 (0.5); by the score seed 1000, the best score is
    # seed 1001's, and the highest train_top10 seed 1000's
    for seed, ssim, score, top10 in ((1000, 0.9, 0.5, 0.8), (1001, 0.1, 0.9, 0.2), (1002, 0.5, 0.1, 0.4)):
        folder = tmp_path / f"images-{seed}"
        folder.mkdir()
        for name in ("grid.png", "nearest.png", "reconstructions.png"):
            plt.imsave(folder / name, np.full((8, 8), seed % 10 / 10.0), cmap="gray")
        runs.append(("all", seed, "FINISHED", {"ssim_nn_train_mean": ssim, "score": score, "train_top10": top10,
                                               "ref_blank_ssim": 0.2}, folder))
    text = _report(tmp_path, "median", _study(tmp_path, "median", claim, runs, fresh_store))
    caption = ("Each variant is shown by its median run by ssim_nn_train_mean among the runs it averages: "
               "all seed 1002 (ssim_nn_train_mean 0.500, the median of 3).")
    grids = text.split("### Median-seed inversion of each variant")[1].split("###")[0]
    assert "](figures/grids.png)" in grids and caption in grids
    recon = text.split("### Best training and held-out reconstructions of each variant's median-seed run")[1]
    assert "](figures/reconstructions.png)" in recon.split("###")[0] and caption in recon.split("###")[0]
