"""A second corpus of malformed sweep files and command lines, as a new user writes them: each is
refused by the real CLI with exit code 2 and one short line naming the field, before Ray starts,
leaving nothing behind (no output folder, no MLflow store, nothing in the working directory).
Reading commands (report, compare) never create a store. No Ray here."""
import itertools
import json
import math

import pytest
import yaml

import harness.sweep.tune
from harness.cli import main
from harness.config import ConfigError, load_yaml
from harness.records.results import fisher_greater
from harness.sweep.files import load_sweep
from tests.test_sweep_file import no_cluster  # noqa: F401 (a fixture)

GOOD = {
    "name": "m",
    "base": {"train": {"epochs": 4}},
    "axes": {"classifier.pool": ["avg", "max"]},
    "search": {"loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5}},
    "budget": {"num_samples": 2},
}


def sweep_text(**changes) -> str:
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return yaml.safe_dump(spec)


@pytest.fixture
def place(no_cluster, tmp_path):
    """The working directory, in which anything written shows up; Ray and MLflow must not start."""
    return tmp_path


def contents(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(argv: list[str], folder, capsys, *names: str) -> str:
    """Run the CLI; it must exit 2 with one line naming each of `names`, and write nothing."""
    before = contents(folder)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:2000]
    from harness.cli import MAX_MESSAGE

    assert len(lines[0]) <= len("error: ") + MAX_MESSAGE, len(lines[0])
    for name in names:
        assert name in lines[0], lines[0]
    assert contents(folder) == before, "something was written"
    return lines[0]


def write(folder, text: str, name: str = "sweep.yaml"):
    path = folder / name
    path.write_text(text)
    return path


# -- the sweep file -------------------------------------------------------------------------------
DUPLICATES = {
    "objectives twice": (sweep_text() + "objectives: {ssim_nn_train_mean: max}\n"
                         "objectives: {ssim_nn_train_mean: min}\n", "'objectives' given twice"),
    "search twice": (sweep_text(search=None) + "search:\n  loss.tv: {dist: uniform, low: 0.0, high: 0.5}\n"
                     "search:\n  loss.bn: {dist: uniform, low: 0.0, high: 0.5}\n", "'search' given twice"),
    "nested key twice": (sweep_text(base=None) + "base:\n  train:\n    epochs: 4\n    epochs: 8\n",
                         "'epochs' given twice"),
}


@pytest.mark.parametrize("command", ["sweep", "ablate"])
@pytest.mark.parametrize("case", list(DUPLICATES))
def test_a_key_given_twice_is_refused_with_its_line(case, command, place, capsys):
    text, named = DUPLICATES[case]
    file = write(place, text)
    line = refused([command, str(file), "--out", str(place / "out")], place, capsys, named, "lines ")
    first, second = (i + 1 for i, l in enumerate(text.splitlines()) if l.strip().startswith(named.split("'")[1] + ":"))
    assert f"lines {first} and {second}" in line


def test_a_trial_file_with_a_key_twice_is_refused(tmp_path):
    file = write(tmp_path, "loss:\n  kkt: 1\nloss:\n  tv: 0\n", "trial.yaml")
    with pytest.raises(ConfigError, match="'loss' given twice .*lines 1 and 3"):
        load_yaml(file)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    file = write(tmp_path, "a: &d {x: 1, y: 2}\nb:\n  <<: *d\n  y: 3\n", "merge.yaml")
    assert load_yaml(file) == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}


MALFORMED = {
    # two variants that are one setting: `1e-3` reads as a string and becomes 0.001
    "values equal but spelt differently": (sweep_text(axes=None) + "axes:\n  classifier.lr: [1e-3, 0.001]\n",
                                           [], ("axes.classifier.lr", "same setting")),
    "values 1 and 1.0 of a float setting": (sweep_text(axes={"loss.kkt": [1, 1.0]}), [], ("axes.loss.kkt",)),
    "a uniform range on a whole-number setting": (
        sweep_text(search={"train.jitter": {"dist": "uniform", "low": 0, "high": 3}}), [],
        ("search.train.jitter", "dist: int")),
    "a uniform range on an on/off setting": (
        sweep_text(search={"train.amp": {"dist": "uniform", "low": 0, "high": 1}}), [], ("search.train.amp",)),
    "an int range on an on/off setting": (
        sweep_text(search={"train.amp": {"dist": "int", "low": 0, "high": 1}}), [], ("search.train.amp", "choice")),
    "negative sampler seed": (sweep_text(seed=-1), [], ("seed",)),
    "negative trial seed": (sweep_text(base={"seed": -1}), [], ("base", "seed")),
    "negative classifier seed by --set": (sweep_text(), ["--set", "base.classifier.seed=-1"], ("classifier.seed",)),
    "a seed beyond 2**32": (sweep_text(seed=2 ** 32), [], ("seed",)),
    "NUL in an axis value": (sweep_text(axes={"name": ["a", "b\0c"]}), [], ("axes.name", "control character")),
    "escape in an axis value": (sweep_text(axes={"name": ["a", "b\x1b[31m"]}), [], ("axes.name", "control character")),
    "300-character sweep name": (sweep_text(name="n" * 300), [], ("name", "300 characters")),
    "10,000-character sweep name": (sweep_text(name="n" * 10_000), [], ("name",)),
    "300-character axis value": (sweep_text(axes={"name": ["a", "b" * 300]}), [], ("axes.name", "300 characters")),
    "variant name too long": (sweep_text(axes={"name": ["x" * 60], "data.root": ["y" * 60]}), [],
                              ("axes", "variant name")),
    "NUL in the trial name": (sweep_text(base={"name": "a\0b"}), [], ("name", "control character")),
    "a strict bar below the coverage bar": (sweep_text(base={"eval": {"strict_threshold": 0.3}}), [],
                                            ("strict_threshold", "eval.strict_threshold >= eval.recon_threshold")),
}


@pytest.mark.parametrize("command", ["sweep", "ablate"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_sweep_file_is_refused_before_ray(case, command, place, capsys):
    text, extra, names = MALFORMED[case]
    file = write(place, text)
    refused([command, str(file), "--out", str(place / "out"), *extra], place, capsys, *names)


def test_long_input_is_never_echoed_in_full(place, capsys):
    file = write(place, sweep_text(name="my sweep " + "x" * 10_000))
    line = refused(["sweep", str(file), "--out", str(place / "out")], place, capsys, "name")
    assert len(line) < 300


def billion_laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "name: laughs\n" + "\n".join(lines) + f"\nmetric: *a{levels - 1}\n"


def test_alias_expansion_is_capped_and_never_echoed(place, capsys):
    file = write(place, billion_laughs())
    line = refused(["sweep", str(file), "--out", str(place / "out")], place, capsys, "aliases")
    assert "lol" not in line


def test_a_large_value_in_the_wrong_place_is_quoted_short(place, capsys):
    file = write(place, billion_laughs(levels=5))  # 65,000 values: under the cap, but not a metric name
    line = refused(["sweep", str(file), "--out", str(place / "out")], place, capsys)
    assert len(line) < 300 and line.count("lol") <= 8


# -- the command line -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["sweep", "ablate"])
def test_resume_into_a_folder_without_a_sweep(command, place, capsys):
    file = write(place, sweep_text())
    empty = place / "empty"
    empty.mkdir()
    refused([command, str(file), "--out", str(empty), "--resume"], place, capsys, "--resume", "holds no")
    refused([command, str(file), "--out", str(place / "missing"), "--resume"], place, capsys, "--resume")


@pytest.mark.parametrize("axes", [None, {"classifier.pool": ["avg"]}])
def test_ablate_without_two_variants(axes, place, capsys):
    file = write(place, sweep_text(axes=axes))
    refused(["ablate", str(file), "--out", str(place / "out")], place, capsys, "axes", "harness sweep")


def test_ablate_of_one_variant_against_a_value_is_a_study(place, capsys):
    """One variant with a claim against a value (claim.above) is a study (its seeds decide the claim):
    refused here only by the next check, a data root that does not exist, not for its one variant."""
    claim = {"statement": "it leaks", "metric": "coverage_gap", "greater": "pool=avg", "above": 0.0}
    nowhere = place / "no_data"
    file = write(place, sweep_text(axes={"classifier.pool": ["avg"]}, claim=claim,
                                   base={"train": {"epochs": 4}, "data": {"root": str(nowhere)}}))
    refused(["ablate", str(file), "--out", str(place / "out")], place, capsys, "data.root", "does not exist")


@pytest.mark.parametrize("command", ["sweep", "ablate"])
def test_a_data_root_that_does_not_exist(command, place, capsys, monkeypatch):
    nowhere = place / "no_data"
    file = write(place, sweep_text(base={"train": {"epochs": 4}, "data": {"root": str(nowhere)}}))
    refused([command, str(file), "--out", str(place / "out")], place, capsys, "data.root", "does not exist")
    monkeypatch.setenv("HARNESS_DATA_ROOT", str(nowhere))
    file = write(place, sweep_text())
    refused([command, str(file), "--out", str(place / "out")], place, capsys, "HARNESS_DATA_ROOT")
    assert not nowhere.exists()


@pytest.mark.parametrize("command", ["sweep", "ablate"])
@pytest.mark.parametrize("resources, field", [({"cpu": 10_000}, "resources.cpu"),
                                              ({"gpu": 1_000}, "resources.gpu")])
def test_resources_larger_than_this_machine(command, resources, field, place, capsys):
    file = write(place, sweep_text(resources=resources))
    refused([command, str(file), "--out", str(place / "out")], place, capsys, field, "this machine")


def test_resources_are_left_to_the_cluster_with_an_address(place, monkeypatch):
    """With --address, the cluster's machines are known only once connected: no local check."""
    class Connected(Exception):
        pass

    def connect(*args, **kwargs):
        raise Connected
    monkeypatch.setattr(harness.sweep.tune, "init_ray", connect)
    file = write(place, sweep_text(resources={"cpu": 10_000}))
    with pytest.raises(Connected):
        main(["sweep", str(file), "--out", str(place / "out"), "--address", "10.0.0.1:6379"])


@pytest.mark.parametrize("command", ["sweep", "ablate"])
def test_out_naming_an_existing_file(command, place, capsys):
    file = write(place, sweep_text())
    taken = write(place, "notes\n", "notes.txt")
    refused([command, str(file), "--out", str(taken)], place, capsys, "--out", "is a file")
    refused([command, str(file), "--out", str(taken / "sub")], place, capsys, "--out", "is a file")


@pytest.mark.parametrize("uri", ["store", "./runs/store", "file:///tmp/somewhere/mlruns"])
@pytest.mark.parametrize("command", ["sweep", "ablate"])
def test_mlflow_uri_as_a_plain_path(uri, command, place, capsys):
    file = write(place, sweep_text())
    line = refused([command, str(file), "--out", str(place / "out"), "--mlflow-uri", uri], place, capsys,
                   "--mlflow-uri", "sqlite:///")
    assert "/mlflow.db" in line


def test_mlflow_sqlite_store_in_a_missing_folder(place, capsys):
    file = write(place, sweep_text())
    refused(["sweep", str(file), "--out", str(place / "out"), "--mlflow-uri", f"sqlite:///{place}/nowhere/m.db"],
            place, capsys, "--mlflow-uri", "does not exist")


# -- reading commands never create a store ---------------------------------------------------------
def test_report_on_a_missing_store_creates_none(place, capsys):
    db = place / "mlflow.db"
    refused(["report", "--experiment", "nosuch", "--mlflow-uri", f"sqlite:///{db}", "--out", str(place / "r")],
            place, capsys, "no MLflow store", str(db))
    refused(["report", "--experiment", "nosuch", "--mlflow-uri", "sqlite:///mlflow.db"], place, capsys,
            "no MLflow store")
    assert not db.exists() and not (place / "reports").exists()


def test_compare_on_a_missing_store_creates_none(place, capsys):
    db = place / "runs" / "x" / "mlflow.db"
    refused(["compare", "0123abcd", "--mlflow-uri", f"sqlite:///{db}"], place, capsys, "no MLflow store")
    assert not (place / "runs").exists()


def test_report_with_a_plain_path_store(place, capsys):
    refused(["report", "--experiment", "x", "--mlflow-uri", str(place / "runs")], place, capsys, "sqlite:///")


def test_report_out_naming_a_file(place, capsys, fresh_store):
    db = place / "mlflow.db"
    fresh_store(db)  # an existing store
    write(place, "x\n", "report.md")
    capsys.readouterr()
    refused(["report", "--experiment", "x", "--mlflow-uri", f"sqlite:///{db}", "--out", str(place / "report.md")],
            place, capsys, "--out", "is a file")


# -- a count claim needs enough seeds to be decidable --------------------------------------------
@pytest.mark.parametrize("n, expected", [(1, 1 / 2), (2, 1 / 6), (3, 1 / 20), (4, 1 / 70), (5, 1 / 252)])
def test_smallest_fisher_p_known_answers(n, expected):
    from harness.records.results import FISHER_ALPHA, fisher_smallest_p

    assert fisher_smallest_p(n, n) == expected
    assert fisher_smallest_p(3, 3) == 0.05 and not fisher_smallest_p(3, 3) < FISHER_ALPHA
    assert fisher_smallest_p(4, 4) < FISHER_ALPHA


@pytest.mark.parametrize("n1, n2", [(1, 1), (2, 3), (3, 3), (3, 5), (4, 4), (5, 2)])
def test_smallest_fisher_p_is_the_minimum_over_every_table(n1, n2):
    from harness.records.results import fisher_smallest_p

    smallest = min(fisher_greater(k1, n1, k2, n2) for k1, k2 in itertools.product(range(n1 + 1), range(n2 + 1)))
    assert math.isclose(fisher_smallest_p(n1, n2), smallest, rel_tol=1e-9)


COUNT_CLAIM = {"statement": "pert stabilises", "metric": "collapsed", "greater": "pool=avg", "lesser": "pool=max"}


def test_ablate_refuses_a_count_claim_it_cannot_decide(place, capsys):
    file = write(place, sweep_text(claim=COUNT_CLAIM))
    line = refused(["ablate", str(file), "--out", str(place / "out")], place, capsys,
                   "collapsed", "0.05", "at least 4")
    assert "0.0143" in line  # 1/70 at 4 seeds
    refused(["ablate", str(file), "--out", str(place / "out"), "--seeds", "3"], place, capsys, "--seeds")
    file = write(place, sweep_text(claim=COUNT_CLAIM, confirm_seeds=2))
    refused(["ablate", str(file), "--out", str(place / "out")], place, capsys, "smallest attainable p is 0.167")


def test_enough_seeds_decide_a_count_claim(tmp_path):
    from harness.cli import check_claim_decidable

    sweep = load_sweep(write(tmp_path, sweep_text(claim=COUNT_CLAIM, confirm_seeds=4)))
    check_claim_decidable(sweep, sweep.confirm_seeds)
    with pytest.raises(ConfigError):
        check_claim_decidable(sweep, 3)
    check_claim_decidable(load_sweep(write(tmp_path, sweep_text(claim={**COUNT_CLAIM, "metric": "diversity"}))), 2)


def test_sweep_refuses_a_count_claim_its_trials_cannot_decide(place, capsys):
    # budget.num_samples 2 per variant: the smallest attainable p is 1 / C(4, 2) = 0.167
    file = write(place, sweep_text(claim=COUNT_CLAIM))
    line = refused(["sweep", str(file), "--out", str(place / "out")], place, capsys,
                   "budget.num_samples", "collapsed", "0.167", "at least 4", "--set budget.num_samples=4")
    assert "0.0143" in line  # 1/70 at 4 trials
    refused(["sweep", str(file), "--out", str(place / "out"), "--set", "budget.num_samples=3"], place, capsys,
            "budget.num_samples", "smallest attainable p is 0.05")


def test_enough_trials_decide_a_count_claim_in_a_sweep(tmp_path):
    from harness.cli import check_claim_decidable

    sweep = load_sweep(write(tmp_path, sweep_text(claim=COUNT_CLAIM, budget={"num_samples": 4})))
    check_claim_decidable(sweep, sweep.budget.num_samples, sweep_trials=True)
    with pytest.raises(ConfigError, match="budget.num_samples"):
        check_claim_decidable(sweep, 3, sweep_trials=True)
    # a claim on an averaged metric is decided by the interval of the difference, not by counts
    check_claim_decidable(load_sweep(write(tmp_path, sweep_text(claim={**COUNT_CLAIM, "metric": "diversity"}))), 2,
                          sweep_trials=True)


EQUIVALENCE_CLAIM = {"statement": "pooling does not change diversity", "metric": "diversity", "greater": "pool=avg",
                     "lesser": "pool=max", "margin": 0.05}


@pytest.mark.parametrize("changes, words", [
    ({"margin": 0}, "claim.margin"),
    ({"margin": -0.05}, "claim.margin"),
    ({"margin": float("inf")}, "claim.margin"),
    ({"margin": float("nan")}, "claim.margin"),
    ({"margin": "wide"}, "claim.margin"),
    ({"lesser": None, "reference": "ref_blank_ssim"}, "give lesser, not reference"),
    ({"lesser": None, "above": 0.0}, "give lesser, not reference"),
    ({"metric": "collapsed"}, "collapsed is a count"),
])
def test_equivalence_claim_margin_is_checked(tmp_path, changes, words):
    claim = {k: v for k, v in {**EQUIVALENCE_CLAIM, **changes}.items() if v is not None}
    with pytest.raises(ConfigError, match="margin") as err:
        load_sweep(write(tmp_path, sweep_text(claim=claim)))
    assert words in str(err.value), str(err.value)


def test_equivalence_claim_margin_reaches_the_study(tmp_path):
    sweep = load_sweep(write(tmp_path, sweep_text(claim=EQUIVALENCE_CLAIM)))
    assert sweep.claim.margin == 0.05
    assert load_sweep(write(tmp_path, sweep_text(claim={**EQUIVALENCE_CLAIM, "margin": None}))).claim.margin is None
    assert load_sweep(write(tmp_path, sweep_text(claim=EQUIVALENCE_CLAIM)), ["claim.margin=0.1"]).claim.margin == 0.1


def test_shipped_studies_are_decidable_at_their_own_seeds():
    from harness.cli import check_claim_decidable
    from tests.conftest import REPO

    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        sweep = load_sweep(path)
        check_claim_decidable(sweep, sweep.confirm_seeds)
        check_claim_decidable(sweep, sweep.budget.num_samples, sweep_trials=True)  # harness sweep FILE
    perturbation = load_sweep(REPO / "search_spaces" / "perturbation.yaml")  # a claim on collapsed
    assert perturbation.confirm_seeds >= 4
    with pytest.raises(ConfigError, match="at least 4"):
        check_claim_decidable(perturbation, 3)


# -- --resume continues the sweep the folder holds, and no other ----------------------------------
def test_resume_record_known_answers(tmp_path):
    from harness.sweep.files import check_resume, sweep_record, write_record

    def record(kind="sweep", seeds=None, *sets):
        file = tmp_path / "s.yaml"
        file.write_text(sweep_text())
        return sweep_record(load_sweep(file, list(sets)), kind, seeds)

    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ConfigError, match="older version"):
        check_resume(folder, record())  # a folder without a record: made before the record existed
    write_record(folder, record())
    check_resume(folder, record())  # the same sweep
    with pytest.raises(ConfigError, match="budget.num_samples 5 differs from the 2 trials"):
        check_resume(folder, record("sweep", None, "budget.num_samples=5"))  # Tune keeps the budget it started with
    held = json.loads((folder / "sweep.json").read_text())
    del held["settings"]["confirm_subset"]  # a record written before that setting existed
    (folder / "sweep.json").write_text(json.dumps(held))
    with pytest.raises(ConfigError, match="confirm_subset .a setting the folder's record lacks: it was made by an earlier"):
        check_resume(folder, record())
    write_record(folder, record())
    check_resume(folder, record("sweep", None, "resources.cpu=2"))  # where trials run may change
    for sets, words in ((["budget.num_samples=1"], "differs from the 2 trials"),
                        (["base.train.epochs=5"], "base.train.epochs differs"),
                        (["search.loss.tv={dist: uniform, low: 0.0, high: 0.6}"], "search.loss.tv.high differs"),
                        (["name=n"], "holds sweep 'm', not 'n'")):
        with pytest.raises(ConfigError, match=words):
            check_resume(folder, record("sweep", None, *sets))
    with pytest.raises(ConfigError, match="holds a sweep, not a study"):
        check_resume(folder, record("study", [1000, 1001]))
    write_record(folder, record("study", [1000, 1001]))
    with pytest.raises(ConfigError, match="confirmation seeds"):
        check_resume(folder, record("study", [1000, 1001, 1002]))


def test_resume_a_record_made_before_claim_margin_existed(tmp_path):
    from harness.sweep.files import check_resume, sweep_record, write_record

    file = write(tmp_path, sweep_text(claim=COUNT_CLAIM))
    now = sweep_record(load_sweep(file), "sweep")
    assert now["settings"]["claim"]["margin"] is None
    older = {**now, "settings": {**now["settings"], "claim": {k: v for k, v in now["settings"]["claim"].items()
                                                              if k != "margin"}}}
    folder = tmp_path / "out"
    folder.mkdir()
    write_record(folder, older)
    check_resume(folder, now)  # an optional setting added since, left unset: the same sweep
    with pytest.raises(ConfigError, match="claim.margin .a setting the folder.s record lacks"):
        check_resume(folder, sweep_record(load_sweep(file, ["claim.metric=diversity", "claim.margin=0.1"]), "sweep"))


# -- issue 28: --set on a variant the file does not name -------------------------------------------
NAMED = {"full": None, "no_kkt": {"loss.kkt": 0}, "no_bn": {"loss.bn": 0}}


@pytest.mark.parametrize("command", ["sweep", "ablate"])
def test_set_on_a_variant_the_file_does_not_name(command, place, capsys):
    file = write(place, sweep_text(axes=None, variants=NAMED))
    line = refused([command, str(file), "--out", str(place / "out"), "--set", "variants.nobn.loss.bn=0.5"],
                   place, capsys, "variants.nobn", "not a variant")
    assert all(name in line.split("its variants are")[1] for name in NAMED)
    file = write(place, sweep_text())  # axes, no named variants
    refused([command, str(file), "--out", str(place / "out"), "--set", "variants.x.y=1"], place, capsys,
            "variants.x", "no named variants")


def test_set_on_a_variant_the_file_names_still_works(tmp_path):
    file = write(tmp_path, sweep_text(axes=None, variants=NAMED))
    variants = load_sweep(file, ["variants.no_kkt.loss.ce=0.5", "variants.full.loss.cos=2"]).named_variants
    assert variants == {"full": {"loss.cos": 2}, "no_kkt": {"loss.kkt": 0, "loss.ce": 0.5}, "no_bn": {"loss.bn": 0}}


# -- issue 28: every number is a finite number, and true is not one -------------------------------
@pytest.mark.parametrize("value, words", [("inf", "inf is not a finite number"), (".nan", "nan is not a finite number"),
                                          ("-.inf", "-inf is not a finite number"), ("true", "true is not a number")])
def test_run_refuses_a_weight_that_is_not_a_finite_number(value, words, place, capsys):
    line = refused(["run", "--set", f"loss.kkt={value}", "--out", str(place / "out")], place, capsys, "loss.kkt", words)
    assert "give a number such as 1.0" in line


def test_run_refuses_inf_in_a_config_file(place, capsys):
    config = write(place, "loss:\n  kkt: .inf\n", "trial.yaml")
    refused(["run", "--config", str(config), "--out", str(place / "out")], place, capsys,
            "loss.kkt", "not a finite number")
    config = write(place, "train:\n  epochs: true\n", "trial.yaml")
    refused(["run", "--config", str(config), "--out", str(place / "out")], place, capsys,
            "train.epochs", "not a number", "whole number")


@pytest.mark.parametrize("command", ["sweep", "ablate"])
@pytest.mark.parametrize("text, names", [
    (sweep_text(base={"train": {"epochs": 4}, "loss": {"kkt": True}}), ("base", "loss.kkt", "true is not a number")),
    (sweep_text(search={"loss.tv": {"dist": "uniform", "low": 0.0, "high": math.inf}}),
     ("search.loss.tv.high", "inf is not a finite number")),
    (sweep_text(budget={"num_samples": True}), ("budget.num_samples", "true is not a number")),
    (sweep_text(resources={"gpu": math.nan}), ("resources.gpu", "nan is not a finite number")),
])
def test_sweep_file_numbers_are_finite_numbers(text, names, command, place, capsys):
    file = write(place, text)
    refused([command, str(file), "--out", str(place / "out")], place, capsys, *names)
    refused([command, str(write(place, sweep_text())), "--out", str(place / "out"), "--set", "base.loss.kkt=inf"],
            place, capsys, "loss.kkt", "not a finite number")


def test_numbers_and_booleans_still_take_their_own_values(tmp_path):
    from harness.config import build_config

    cfg = build_config({}, ["loss.kkt=1", "loss.tv=0", "train.epochs=3", "classifier.bias=false", "train.amp=true",
                            "loss.kkt_layers=2", "classifier.widths=[100, 50]", "name=inf"])
    assert (cfg.loss.kkt, cfg.loss.tv, cfg.train.epochs, cfg.classifier.bias, cfg.train.amp) == (1.0, 0.0, 3, False, True)
    assert cfg.classifier.widths == [100, 50] and cfg.name == "inf"
    sweep = load_sweep(write(tmp_path, sweep_text(
        search={"train.amp": {"dist": "choice", "values": [True, False]},
                "loss.tv": {"dist": "uniform", "low": 0, "high": 1, "allow_off": True}},
        resources={"gpu": "auto"}, asha={"enabled": False})))
    assert sweep.search["train.amp"].values == [True, False] and sweep.resources.gpu == "auto"


# -- issue 28: a malformed SQLite URI, and a tracking server that does not answer -----------------
def sweep_or_reader(command: str, place, uri: str) -> list[str]:
    if command in ("sweep", "ablate"):
        return [command, str(write(place, sweep_text())), "--out", str(place / "out"), "--mlflow-uri", uri]
    if command == "report":
        return ["report", "--experiment", "x", "--mlflow-uri", uri, "--out", str(place / "out")]
    return ["compare", "0123abcd", "--mlflow-uri", uri]


@pytest.mark.parametrize("command", ["sweep", "ablate", "report", "compare"])
@pytest.mark.parametrize("uri, meant", [("sqlite://relative.db", "sqlite:///relative.db"),
                                        ("sqlite:relative.db", "sqlite:///relative.db"),
                                        ("sqlite://", "sqlite:///ABSOLUTE/PATH.db")])
def test_mlflow_uri_malformed_sqlite(uri, meant, command, place, capsys):
    refused(sweep_or_reader(command, place, uri), place, capsys, "--mlflow-uri", uri, meant, "three slashes")


def test_mlflow_uri_wellformed_sqlite_passes(tmp_path):
    from harness.records.mlflow_store import check_tracking_uri

    for uri in ("sqlite:///relative.db", f"sqlite:///{tmp_path}/m.db", "sqlite:///runs/x/mlflow.db?mode=ro"):
        check_tracking_uri(uri)


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("command", ["sweep", "ablate", "report", "compare"])
def test_mlflow_server_that_does_not_answer_exits_3_at_once(command, place, capsys, no_proxy):
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    argv = sweep_or_reader(command, place, uri)
    before = contents(place)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:2000]
    assert uri in lines[0] and "start the server or check --mlflow-uri" in lines[0], lines[0]
    assert contents(place) == before, "something was written"


def test_mlflow_server_that_answers_passes_the_check(no_proxy):
    """Any HTTP answer passes (here a 404: a server without /health); the check is one request."""
    import http.server
    import threading

    from harness.records.mlflow_store import check_server

    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_server(f"http://127.0.0.1:{server.server_port}/")
        check_server(f"http://user:secret@127.0.0.1:{server.server_port}/prefix")
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/health", "/prefix/health"]


@pytest.mark.parametrize("changes, words", [
    ({"above": 0.0}, "give exactly one of lesser (a variant), reference (a ref_* metric) or above (a value)"),
    ({"lesser": None, "above": float("nan")}, "claim.above"),
    ({"lesser": None, "above": "zero"}, "claim.above"),
    ({"lesser": None, "metric": "collapsed", "above": 0.0}, "collapsed is a count"),
])
def test_claim_above_a_value_is_checked(tmp_path, changes, words):
    claim = {k: v for k, v in {**EQUIVALENCE_CLAIM, "margin": None, **changes}.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        load_sweep(write(tmp_path, sweep_text(claim=claim)))
    assert words in str(err.value), str(err.value)
    good = {k: v for k, v in {**EQUIVALENCE_CLAIM, "margin": None, "lesser": None, "above": 0.0}.items() if v is not None}
    assert load_sweep(write(tmp_path, sweep_text(claim=good))).claim.above == 0.0
