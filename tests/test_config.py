import subprocess
import sys

import pytest

from harness.config import ConfigError, build_config, describe_fields, flatten, parse_overrides


def test_defaults_are_the_documented_default_run():
    cfg = build_config()
    assert (cfg.data.dataset, cfg.data.train_size) == ("mnist", 1000)
    assert (cfg.classifier.arch, cfg.classifier.depth, cfg.classifier.pool) == ("cnn", 2, "avg")
    assert all(doc for _, _, doc in describe_fields()), "every field documents itself"


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["loss.kkt=1", "classifier.pool=max", "loss.bn=0.5"]) == {
        "loss": {"kkt": 1, "bn": 0.5}, "classifier": {"pool": "max"}}
    cfg = build_config({"loss": {"cos": 0.2}}, ["loss.kkt=1"])
    assert cfg.loss.kkt == 1 and cfg.loss.cos == 0.2


@pytest.mark.parametrize("overrides, field", [
    (["loss.kkt=-1"], "loss.kkt"),
    (["classifier.pool=median"], "classifier.pool"),
    (["data.train_size=70000"], "train_size"),
    (["data.train_size=1005"], "train_size"),
    (["data.dataset=cifar10"], "data.dataset"),
    (["classifier.poool=max"], "classifier.poool"),
    (["loss.ce=abc"], "loss.ce"),
    (["classifier.depth=5"], "classifier.depth"),
    (["typo=1"], "typo"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed here: .*pool"):
        build_config({"classifier": {"poool": "max"}})


def test_flatten_names_match_mlflow_params():
    flat = flatten(build_config().model_dump())
    assert flat["loss.kkt"] == 0.0 and flat["classifier.pool"] == "avg"


@pytest.mark.parametrize("args", [
    ["--set", "loss.kkt=-1"],
    ["--set", "classifier.pool=median"],
    ["--set", "data.train_size=999999"],
    ["--set", "data.dataset=svhn"],
    ["--config", "does-not-exist.yaml"],
])
def test_cli_rejects_bad_input_with_exit_2_and_writes_nothing(tmp_path, args):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists()
