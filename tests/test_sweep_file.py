"""Sweep files are user input: every malformed one is refused by the real CLI with exit code 2
and one line naming the field, before Ray starts, leaving no MLflow run, Optuna study or Ray
storage. Also: variant names, metric names, confirmation seeds. No Ray here."""
import subprocess
import sys

import pytest
import yaml

import harness.sweep.tune
from harness.cli import main
from harness.config import ConfigError
from harness.sweep.files import SweepConfig, load_sweep, short_keys

GOOD = {
    "name": "good",
    "base": {"train": {"epochs": 4}},
    "axes": {"classifier.pool": ["avg", "max"]},
    "search": {"loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5},
               "loss.cos": {"dist": "loguniform", "low": 0.01, "high": 1.0, "allow_off": True}},
    "budget": {"num_samples": 2},
    "claim": {"statement": "avg leaks more", "metric": "ssim_nn_train_mean",
              "greater": "pool=avg", "lesser": "pool=max"},
}


def _with(**changes):
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return yaml.safe_dump(spec)


_DELETE = object()

# (sweep file text or None for a missing file, extra CLI args, what the one-line error must name)
MALFORMED = {
    "unknown top-level key": (_with(metrc="score"), [], "metrc"),
    "unknown key in a section": (_with(**{"asha/grace": 2}), [], "asha.grace"),
    "unknown key in base": (_with(**{"base/train/epochz": 2}), [], "epochz"),
    "unknown key in a distribution": (_with(**{"search/loss.tv/log": True}), [], "search.loss.tv.log"),
    "unknown key in the claim": (_with(**{"claim/metirc": "diversity"}), [], "claim.metirc"),
    "unknown key via --set": (_with(), ["--set", "budget.num_sample=3"], "budget.num_sample"),
    "searched key not a setting": (_with(**{"search/loss.tvv": {"dist": "uniform", "low": 0, "high": 1}}), [],
                                   "search.loss.tvv"),
    "searched key is a section": (_with(**{"search/loss": {"dist": "uniform", "low": 0, "high": 1}}), [],
                                  "search.loss"),
    "axis key not a setting": (_with(axes={"classifier.pooling": ["avg"]}, claim=_DELETE), [],
                               "axes.classifier.pooling"),
    "axis value not valid": (_with(axes={"classifier.pool": ["avg", "median"]}), [], "axes.classifier.pool"),
    "empty axis": (_with(axes={"classifier.pool": []}, claim=_DELETE), [], "axes.classifier.pool"),
    "axes and variants": (_with(variants={"a": {"classifier.pool": "max"}}), [], "variants: give axes or variants"),
    "variant name not plain": (_with(axes=_DELETE, claim=_DELETE, variants={"a/b": {"classifier.pool": "max"}, "c": {}}),
                               [], "variants: 'a/b'"),
    "variant key not a setting": (_with(axes=_DELETE, claim=_DELETE, variants={"a": {"loss.kktt": 0}, "b": {}}), [],
                                  "variants.a.loss.kktt"),
    "variant value not valid": (_with(axes=_DELETE, claim=_DELETE, variants={"a": {"classifier.pool": "median"},
                                                                            "b": {}}), [], "variants.a"),
    "two variants the same trial": (_with(axes=_DELETE, claim=_DELETE, variants={"a": {"loss.kkt": 0}, "b": {}}), [],
                                    "variants.b: the same trial settings as variants.a"),
    "variant setting also searched": (_with(axes=_DELETE, claim=_DELETE,
                                            variants={"a": {"loss.tv": 0}, "b": {"loss.kkt": 1}}), [],
                                      "search.loss.tv: also set by variants.a"),
    "variant named like a phase": (_with(axes=_DELETE, claim=_DELETE, variants={"confirm-a": {"loss.kkt": 1}, "a": {}}),
                                   [], "variants: 'confirm-a' starts like the folder of another phase"),
    "axis also searched": (_with(**{"search/classifier.pool": {"dist": "choice", "values": ["avg"]}}), [],
                           "search.classifier.pool"),
    "low equals high": (_with(**{"search/loss.tv": {"dist": "uniform", "low": 0.5, "high": 0.5}}), [],
                        "search.loss.tv"),
    "low above high": (_with(**{"search/loss.tv": {"dist": "uniform", "low": 0.6, "high": 0.5}}), [],
                       "search.loss.tv"),
    "loguniform from zero": (_with(**{"search/loss.cos/low": 0.0}), [], "search.loss.cos"),
    "loguniform negative": (_with(**{"search/loss.cos": {"dist": "loguniform", "low": -2, "high": -1}}), [],
                            "search.loss.cos"),
    "infinite bound": (_with(**{"search/loss.tv/high": float("inf")}), [], "search.loss.tv"),
    "searched range outside the setting": (_with(**{"search/loss.tv/low": -1.0}), [], "search.loss.tv"),
    "unknown distribution": (_with(**{"search/loss.tv/dist": "normal"}), [], "search.loss.tv.dist"),
    "choice without values": (_with(**{"search/loss.tv": {"dist": "choice", "values": []}}), [], "search.loss.tv"),
    "zero samples": (_with(**{"budget/num_samples": 0}), [], "budget.num_samples"),
    "zero CPUs": (_with(resources={"cpu": 0}), [], "resources.cpu"),
    "negative GPUs": (_with(resources={"gpu": -1}), [], "resources.gpu"),
    "zero concurrency": (_with(resources={"max_concurrent": 0}), [], "resources.max_concurrent"),
    "reduction factor 1": (_with(asha={"reduction_factor": 1}), [], "asha.reduction_factor"),
    "reduction factor below 1": (_with(asha={"reduction_factor": 0.5}), [], "asha.reduction_factor"),
    "grace period beyond the epochs": (_with(asha={"grace_period": 5}), [], "asha.grace_period"),
    "name escaping the output folder": (_with(name="../../escape"), [], "name"),
    "name with a slash": (_with(name="a/b"), [], "name"),
    "name with a space": (_with(name="my sweep"), [], "name"),
    "missing name": (_with(name=_DELETE), [], "name"),
    "misspelt metric": (_with(metric="scroe"), [], "metric"),
    "misspelt objective": (_with(objectives={"ssim_nn_train_mean": "max", "diversty": "max"}), [], "objectives"),
    "metric not among the objectives": (_with(metric="score", objectives={"ssim_nn_train_mean": "max"}), [],
                                        "metric 'score' is not one of the objectives"),
    "mode against the objective's direction": (
        _with(metric="diversity", mode="min", objectives={"diversity": "max"}), [], "mode 'min' contradicts"),
    "the epoch budget searched": (_with(**{"search/train.epochs": {"dist": "int", "low": 2, "high": 4}}), [],
                                  "search.train.epochs: sets the budget"),
    "steps per epoch searched": (_with(**{"search/train.steps_per_epoch": {"dist": "int", "low": 2, "high": 4}}), [],
                                 "search.train.steps_per_epoch"),
    "misspelt claim metric": (_with(**{"claim/metric": "ssim_nn_train"}), [], "claim.metric"),
    "claim reference not a reference point": (
        _with(claim={"statement": "s", "greater": "pool=avg", "reference": "ref_black"}), [], "claim.reference"),
    "claim on an unknown variant": (_with(**{"claim/greater": "pool=median"}), [], "claim.greater"),
    "claim lesser equal to greater": (_with(**{"claim/lesser": "pool=avg"}), [], "claim.lesser"),
    "claim on an ambiguous short name": (
        _with(axes={"classifier.dropout": [0.1], "generator.dropout": [0.5]},
              claim={"statement": "s", "greater": "dropout=0.1__dropout=0.5", "reference": "ref_blank_ssim"}),
        [], "claim.greater"),
    "bad mode": (_with(mode="maximum"), [], "mode"),
    "control with an unknown setting": (_with(control={"inverter": "direct", "direct": {"lrr": 0.1}}), [], "control"),
    "control with a bad value": (_with(control={"inverter": "gradient"}), [], "control"),
    "empty control": (_with(control={}), [], "control"),
    "time budget in a sweep": (_with(**{"base/train/max_seconds": 30}), [], "train.max_seconds"),
    "time budget in the control": (_with(control={"inverter": "direct", "train": {"max_seconds": 30}}), [],
                                   "train.max_seconds"),
    "top level is a list": ("- name: x\n", [], "config"),
    "YAML syntax error": ("name: good\nsearch: {loss.tv: {dist: uniform\n", [], "config"),
    "empty file": ("", [], "config"),
    "comments only": ("# nothing here\n", [], "config"),
    "missing file": (None, [], "config"),
}


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """A sweep that got past validation would start Ray here: make that a test failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a malformed sweep file")
    monkeypatch.setattr(harness.sweep.tune, "init_ray", refuse)
    monkeypatch.setattr(harness.sweep.tune, "open_tracking", refuse)
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show up here


@pytest.mark.parametrize("command", ["sweep", "ablate"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_sweep_file_exits_2_naming_the_field(case, command, tmp_path, capsys, no_cluster):
    text, extra, field = MALFORMED[case]
    file = tmp_path / "sweep.yaml"
    if text is not None:
        file.write_text(text)
    out = tmp_path / "out"
    code = main([command, str(file), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert field in lines[0], lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"][: int(text is not None)]


def test_misspelt_metric_names_the_valid_ones_through_the_installed_entry_point(tmp_path):
    file = tmp_path / "s.yaml"
    file.write_text(_with(metric="scroe"))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", str(file), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "metric: 'scroe' is not a metric" in proc.stderr
    assert "ssim_nn_train_mean" in proc.stderr and "score" in proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlruns").exists()


def test_the_shipped_files_load():
    from tests.conftest import REPO

    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        load_sweep(path)
        assert load_sweep(path, smoke=True).asha.grace_period == 1  # --smoke fits every file's 2 epochs


def test_a_multi_objective_search_prunes_on_its_first_objective_by_default():
    spec = yaml.safe_load(_with(objectives={"collapsed": "min", "diversity": "max"}))
    sweep = SweepConfig(**spec)
    assert (sweep.metric, sweep.mode) == ("collapsed", "min")
    sweep = SweepConfig(**{**spec, "metric": "diversity"})
    assert (sweep.metric, sweep.mode) == ("diversity", "max")
    assert (SweepConfig(**yaml.safe_load(_with())).metric, SweepConfig(**yaml.safe_load(_with())).mode) == ("score", "max")


# -- variant names --------------------------------------------------------------------------
def test_short_variant_names_unless_ambiguous():
    assert short_keys(["classifier.pool"]) == {"classifier.pool": "pool"}
    assert short_keys(["classifier.dropout", "generator.dropout", "loss.kkt"]) == {
        "classifier.dropout": "classifier.dropout", "generator.dropout": "generator.dropout", "loss.kkt": "kkt"}
    assert short_keys(["seed", "classifier.seed"]) == {"seed": "seed", "classifier.seed": "classifier.seed"}


def test_variant_names_are_unique_and_claims_use_them():
    sweep = SweepConfig.model_validate({
        "name": "d", "axes": {"classifier.dropout": [0.1, 0.5], "generator.dropout": [0.5]},
        "claim": {"statement": "s", "greater": "classifier.dropout=0.1__generator.dropout=0.5",
                  "lesser": "classifier.dropout=0.5__generator.dropout=0.5"}})
    assert [n for n, _ in sweep.variants()] == ["classifier.dropout=0.1__generator.dropout=0.5",
                                                "classifier.dropout=0.5__generator.dropout=0.5"]
    pooling = SweepConfig.model_validate({"name": "p", "axes": {"classifier.pool": ["avg", "max"]},
                                          "claim": {"statement": "s", "greater": "pool=avg", "lesser": "pool=max"}})
    assert [n for n, _ in pooling.variants()] == ["pool=avg", "pool=max"]


# -- confirmation seeds -----------------------------------------------------------------------
@pytest.mark.parametrize("spec, seeds", [
    ({}, [1000, 1001, 1002]),                                   # tuning used seed 0 only
    ({"base": {"seed": 5000}}, [5001, 5002, 5003]),             # after the largest tuning seed
    ({"base": {"classifier": {"seed": 7}}}, [1000, 1001, 1002]),
    ({"axes": {"classifier.seed": [0, 2000]}}, [2001, 2002, 2003]),
    ({"search": {}, "base": {"seed": 998}, "budget": {"num_samples": 4}}, [1002, 1003, 1004]),  # 998..1001
    ({"search": {"seed": {"dist": "int", "low": 0, "high": 1500}}}, [1501, 1502, 1503]),
])
def test_confirmation_seeds_are_disjoint_from_tuning_seeds(spec, seeds):
    base = {"name": "s", "search": {"loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5}}}
    sweep = SweepConfig.model_validate({**base, **spec})
    assert sweep.confirmation_seeds(3) == seeds


def test_control_replaces_the_base_and_keeps_the_axes():
    sweep = SweepConfig.model_validate(yaml.safe_load(_with(control={"inverter": "direct", "train": {"epochs": 2},
                                                                     "loss": {"tv": 0.7}},
                                                            budget={"num_samples": 2, "epochs": 7,
                                                                    "steps_per_epoch": 5})))
    assert sweep.epochs({}) == 7  # the budget applies to the study's own trials ...
    merged = sweep.control_base({"classifier.pool": "max"})
    assert merged["inverter"] == "direct" and merged["train"]["epochs"] == 2 and merged["loss"]["tv"] == 0.7
    assert merged["classifier"]["pool"] == "max"  # the variant's classifier, not the base's
    phase = sweep.control_sweep()
    assert phase.search == {} and not phase.asha.enabled and phase.control is None
    assert phase.trial_base({"classifier.pool": "max"}) == merged and phase.epochs({}) == 2  # ... not the control's
    assert "steps_per_epoch" not in merged["train"]  # the base's steps (the default), not the budget's 5


def test_smoke_shrinks_the_control_too(tmp_path):
    file = tmp_path / "s.yaml"
    file.write_text(_with(control={"inverter": "direct", "train": {"epochs": 9, "steps_per_epoch": 100}}))
    control = load_sweep(file, smoke=True).control_base({})
    assert control["train"]["epochs"] == 2 and control["train"]["steps_per_epoch"] == 3


def test_named_variants_give_their_names_and_settings_in_the_files_order():
    """A leave-one-out ablation is not a product of axes: `variants` names each variant's settings."""
    spec = yaml.safe_load(_with(axes=_DELETE, claim={"statement": "kkt helps", "metric": "coverage_gap",
                                                     "greater": "full", "lesser": "no_kkt"},
                                base={"loss": {"kkt": 1.0, "pert": 0.5}},
                                variants={"full": None, "no_kkt": {"loss.kkt": 0}, "no_pert": {"loss.pert": 0}}))
    sweep = SweepConfig(**spec)
    assert sweep.variants() == [("full", {}), ("no_kkt", {"loss.kkt": 0}), ("no_pert", {"loss.pert": 0})]
    assert (sweep.trial_base({"loss.kkt": 0})["loss"]["kkt"], sweep.trial_base({})["loss"]["kkt"]) == (0, 1.0)
    with pytest.raises(ValueError, match="claim.lesser: 'no_tv' is not a variant; variants are full, no_kkt, no_pert"):
        SweepConfig(**{**spec, "claim": {**spec["claim"], "lesser": "no_tv"}})


def test_set_on_axes_search_and_variants_takes_the_dotted_setting_name_whole(tmp_path):
    file = tmp_path / "good.yaml"
    file.write_text(_with(claim=_DELETE))
    sweep = load_sweep(file, ["axes.classifier.pool=[max]", "search.loss.tv={dist: uniform, low: 0.1, high: 0.2}",
                              "base.train.epochs=6", "budget.num_samples=3",
                              "search.loss.cos={dist: loguniform, low: 0.1, high: 0.5}"])
    assert sweep.axes == {"classifier.pool": ["max"]}  # the file's axis, replaced
    assert (sweep.search["loss.tv"].low, sweep.search["loss.tv"].high) == (0.1, 0.2)
    # a searched entry is replaced whole: the file's allow_off of loss.cos is not kept
    assert (sweep.search["loss.cos"].low, sweep.search["loss.cos"].allow_off) == (0.1, False)
    assert sweep.base["train"]["epochs"] == 6 and sweep.budget.num_samples == 3
    choice = load_sweep(file, ["search.loss.tv={dist: choice, values: [0, 0.1]}"])
    assert (choice.search["loss.tv"].values, choice.search["loss.tv"].low) == ([0, 0.1], None)
    # an axis the file does not have is added beside its own; the last of two pairs wins
    two = load_sweep(file, ["axes.loss.kkt=[0, 1]", "axes.loss.kkt=[0, 2]"])
    assert two.axes == {"classifier.pool": ["avg", "max"], "loss.kkt": [0, 2]}
    # one setting of a named variant
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump({"name": "named", "variants": {"full": None, "no_kkt": {"loss.kkt": 0}}}))
    variants = load_sweep(named, ["variants.no_kkt.loss.ce=0.5", "variants.full.loss.tv=2"]).named_variants
    assert variants == {"full": {"loss.tv": 2}, "no_kkt": {"loss.kkt": 0, "loss.ce": 0.5}}
    with pytest.raises(ConfigError, match=r"^--set axes\.data\.train_size is not valid YAML"):
        load_sweep(file, ["axes.data.train_size=[500"])
