"""The study's design, decided before any run and stated beside the verdict: one classifier regime
for every variant (a search over the classifier's settings is refused, or named as a confound), and
per-variant tuning large enough for TPE to act (or the report says it was not)."""
from types import SimpleNamespace

import pytest
import yaml

from harness.cli import main
from harness.config import ConfigError
from harness.report.verdicts import design_notes
from harness.sweep.files import check_one_regime, load_sweep

STUDY = {
    "name": "d",
    "base": {"train": {"epochs": 2}},
    "axes": {"classifier.pool": ["avg", "max"]},
    "search": {"loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5},
               "classifier.weight_decay": {"dist": "loguniform", "low": 0.001, "high": 0.01}},
    "budget": {"num_samples": 8},
    "tpe_startup_trials": 4,
}


def _file(tmp_path, **changes):
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **changes}))
    return path


def test_a_study_that_tunes_the_classifier_per_variant_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="search.classifier.weight_decay: decides the classifier"):
        check_one_regime(load_sweep(_file(tmp_path)))
    check_one_regime(load_sweep(_file(tmp_path, classifier_confound=True)))  # stated, then reported
    check_one_regime(load_sweep(_file(tmp_path, search={"loss.tv": STUDY["search"]["loss.tv"]})))  # inverter only
    one = {**STUDY, "axes": {}}
    check_one_regime(load_sweep(_file(tmp_path, **one)))  # a sweep of one configuration compares nothing
    out = tmp_path / "out"
    assert main(["ablate", str(_file(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classifier_confound" in err[0] and not out.exists()


def _run(pool, wd):
    return SimpleNamespace(data=SimpleNamespace(params={"classifier.weight_decay": str(wd), "classifier.pool": pool},
                                                metrics={}), info=SimpleNamespace(status="FINISHED"))


def test_design_notes_name_the_confound_with_each_variants_values():
    params = {"search.classifier.weight_decay.dist": "loguniform", "search.loss.tv.dist": "uniform",
              "budget.num_samples": "8", "tpe_startup_trials": "4"}
    notes = design_notes(params, {"pool=avg": [_run("avg", 0.00118)] * 2, "pool=max": [_run("max", 0.00265)]})
    assert len(notes) == 1 and notes[0].startswith("**Confound:**")
    assert "pool=avg 0.00118" in notes[0] and "pool=max 0.00265" in notes[0]


@pytest.mark.parametrize("trials, startup, small", [(8, 4, False), (4, 2, True), (8, 5, True), (12, 4, False)])
def test_design_notes_say_when_tuning_was_too_small_for_tpe(trials, startup, small):
    params = {"search.loss.tv.dist": "uniform", "budget.num_samples": str(trials), "tpe_startup_trials": str(startup)}
    notes = design_notes(params, {})
    assert bool(notes) == small
    if small:
        assert f"{trials} trials per variant" in notes[0] and f"{trials - startup} drawn by TPE" in notes[0]
    assert design_notes({"budget.num_samples": "1"}, {}) == []  # no search: nothing tuned


def _seeded(seed, subset):
    params = {"seed": str(seed), "classifier.seed": str(seed)}
    if subset is not None:
        params["data.subset_seed"] = str(subset)
    return SimpleNamespace(data=SimpleNamespace(params=params, metrics={}), info=SimpleNamespace(status="FINISHED"))


def test_the_seeds_section_says_what_each_seed_varied():
    from harness.report.sections import seed_varies

    paired = {"a": [_seeded(1000, 1000), _seeded(1001, 1001)], "b": [_seeded(1000, 1000), _seeded(1001, 1001)]}
    assert "training subset's seed (data.subset_seed) to s" in seed_varies(paired)
    fixed = {"a": [_seeded(1000, 0), _seeded(1001, 0)]}
    assert "the same at every seed (data.subset_seed 0)" in seed_varies(fixed)
    older = {"a": [_seeded(1000, None)]}  # a store made before the subset seed was logged
    assert "initialisation noise on one set of training images" in seed_varies(older)


def _trial(number, status, reason=""):
    tags = {"harness.optuna_trial": str(number)}
    if reason:
        tags["harness.stop_reason"] = reason
    return SimpleNamespace(data=SimpleNamespace(params={}, metrics={}, tags=tags), info=SimpleNamespace(status=status))


def test_a_sweep_report_lists_the_trials_left_out_of_its_averages_and_why():
    from harness.report.sections import left_out_lines

    runs = {"all": [_trial(0, "FINISHED"), _trial(1, "KILLED", "pruned by ASHA at epoch 2"), _trial(2, "FINISHED"),
                    _trial(3, "FAILED", "error: see the Ray trial's error.txt")],
            "b": [_trial(0, "FINISHED")]}
    lines = left_out_lines(runs)
    assert "- all: 2 of 4 trials averaged; left out: trial 1 (pruned by ASHA at epoch 2), trial 3 (error: see " \
           "the Ray trial's error.txt)" in lines
    assert "- b: all 1 trials averaged" in lines


def test_confirm_subset_refuses_a_study_that_varies_the_subset_itself(tmp_path):
    base = {**STUDY, "search": {"loss.tv": STUDY["search"]["loss.tv"]}}
    with pytest.raises(ConfigError, match="axes.data.subset_seed: confirm_subset sets data.subset_seed"):
        check_one_regime(load_sweep(_file(tmp_path, **{**base, "axes": {"data.subset_seed": [0, 1]}})))
    check_one_regime(load_sweep(_file(tmp_path, **{**base, "axes": {"data.subset_seed": [0, 1]},
                                                   "confirm_subset": False})))
    # a tuning subset seed at 1000 or above moves the confirmation seeds past it
    sweep = load_sweep(_file(tmp_path, **{**base, "base": {"train": {"epochs": 2}, "data": {"subset_seed": 1500}}}))
    assert sweep.confirmation_seeds(2) == [1501, 1502]
