"""The real entry point and the Trial on real MNIST at a tiny budget."""
import json
import subprocess
import sys

import pytest
import torch

from harness.science.classifiers import pretrained_classifier
from harness.science.losses import loss_weights
from harness.records.metric_names import METRIC_NAMES, REFERENCE_NAMES
from harness.trial import Trial
from tests.conftest import tiny_overrides

# named in METRIC_NAMES ahead of the Evaluator computing them; empty this set once it does
def test_harness_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--quiet", "--out", str(out),
                           *[a for o in tiny_overrides(**{"loss.bn": 0.1, "loss.cos": 0.2}) for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ssim_nn_train_mean" in proc.stdout and "ref_blank_ssim" in proc.stdout
    for name in ("metrics.json", "history.json", "grid.png", "nearest.png", "samples.pt", "inverter.pt",
                 "config.yaml", "per_train_best_ssim.json", "reconstructions.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_NAMES) | set(REFERENCE_NAMES) <= set(metrics)
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and {"loss_ce", "loss_bn", "loss_cos"} <= set(history[0])
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples["images"].shape == (100, 1, 28, 28) and samples["labels"].shape == (100,)
    assert samples["images"].min() >= -1 and samples["images"].max() <= 1


def test_same_config_gives_the_same_metrics(tiny_config):
    cfg = tiny_config("loss.cos=0.2", "loss.pert=1")
    runs = []
    for _ in range(2):
        trial = Trial(cfg)
        while not trial.done:
            trial.step()
        runs.append(trial.final_metrics())
    for key in ("loss", "ssim_nn_train_mean", "diversity", "score", "fd_eval"):
        assert runs[0][key] == pytest.approx(runs[1][key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("overrides", [
    ("loss.ce=1",),
    ("loss.kkt=1", "classifier.pool=max"),
    ("loss.kl=1", "loss.cos=0.1", "loss.ortho=0.1", "loss.tv=0.1", "loss.pixel=0.1", "loss.pert=1",
     "loss.conf=0.1", "loss.grad=0.1", "loss.kkt=1", "loss.bn=0.1"),
    ("classifier.arch=mlp", "loss.bn=0.1", "loss.kkt=1"),
    # the GPU switch bfloat16 autocast (runs on a CPU too), with every term; one step: a CPU without
    # bfloat16 units emulates it, a step with every term takes seconds (about 15x the float32 step)
    ("train.amp=true", "loss.kl=1", "loss.cos=0.1", "loss.ortho=0.1", "loss.ms=0.1", "loss.pixel=0.1",
     "loss.pert=1", "loss.conf=0.1", "loss.grad=0.1", "loss.kkt=1", "train.steps_per_epoch=1"),
])
def test_loss_combinations_run_and_log_each_term(tiny_config, overrides):
    cfg = tiny_config(*overrides)
    trial = Trial(cfg)
    row = trial.step()
    for name, weight in loss_weights(cfg.loss).items():
        assert (f"loss_{name}" in row) == (weight > 0), name
    assert row["nonfinite"] == 0
    # collapsed: diversity below 0.25 x the held-out diversity, or under 10% distinct nearest images
    collapsed = row["diversity"] < 0.25 * row["ref_heldout_diversity"] or row["unique_nn_frac"] < 0.1
    assert row["collapsed"] == float(collapsed)
    # the score is evaluator_acc x nn-SSIM x min(1, diversity / held-out diversity), 0 when collapsed
    expected = 0.0 if row["collapsed"] else max(0.0, row["evaluator_acc"] * row["ssim_nn_train_mean"] * min(
        1.0, row["diversity"] / row["ref_heldout_diversity"]))
    assert row["score"] == pytest.approx(expected, abs=1e-12)


def test_classifier_cache_hit_skips_training(tiny_config, tmp_path):
    cfg = tiny_config("classifier.seed=99", f"cache_dir={tmp_path}")  # its own cache: the first call must build
    _, first = pretrained_classifier(cfg, torch.device("cpu"))
    _, second = pretrained_classifier(cfg, torch.device("cpu"))
    assert (first["cache_hit"], second["cache_hit"]) == (False, True)
    assert first["cache_key"] == second["cache_key"] and second["test_acc"] == first["test_acc"]


def test_nan_loss_stops_with_score_zero(tiny_config):
    trial = Trial(tiny_config("fault=nan", "train.epochs=5"))
    while not trial.done:
        row = trial.step()
    assert trial.epoch == 2 and row["nonfinite"] == 1 and row["score"] == 0


def test_a_nan_run_writes_the_images_its_metrics_scored(tiny_config, tmp_path):
    # epoch 1 is evaluated; the candidates then move without an evaluation (as in an epoch between
    # evaluations); epoch 2's loss turns NaN (fault=nan): the outputs must show the images epoch 1's
    # metrics and nearest indices were computed on, not the moved ones
    trial = Trial(tiny_config("inverter=direct", "fault=nan", "train.epochs=5", "train.eval_every=5"))
    trial.step()
    evaluated = trial.last_evaluation.images.clone()
    with torch.no_grad():
        trial.inverter.images.add_(0.5 * torch.randn_like(trial.inverter.images))
    trial.step()
    assert trial.done and trial.history[-1]["nonfinite"] == 1
    assert not torch.equal(trial.generate_eval_images()[0], evaluated)  # what the outputs must not show
    trial.write_outputs(tmp_path)
    samples = torch.load(tmp_path / "samples.pt")
    assert torch.equal(samples["images"], evaluated)
    assert torch.equal(samples["nearest_train_index"], trial.last_evaluation.nearest_train_index)
    assert json.loads((tmp_path / "metrics.json").read_text())["evaluated_epoch"] == 1


def test_a_restored_trial_evaluates_before_it_reports(tiny_config):
    cfg = tiny_config("train.epochs=4", "train.eval_every=5")
    first = Trial(cfg)
    first.step()
    resumed = Trial(cfg)
    resumed.evaluate()  # an evaluation of the fresh (epoch 0) candidates, not of the checkpoint
    resumed.load_state_dict(first.state_dict())
    assert resumed.last_evaluation is None and resumed.evaluated_epoch == 0
    row = resumed.step()  # epoch 2 is not due (eval_every 5) but nothing of this run was evaluated:
    # evaluated off the schedule (2), so the stopper counts what a run straight through would
    assert row["evaluated"] == 2 and resumed.evaluated_epoch == 2
    # an evaluation asked for off the schedule (a checkpoint's) is flagged 2, which the stopper skips
    assert resumed.step(evaluate=True)["evaluated"] == 2 and resumed.evaluated_epoch == 3
    assert resumed.step()["evaluated"] == 1  # the last epoch is on the schedule


def test_checkpoint_round_trip_resumes_identically(tiny_config):
    cfg = tiny_config("loss.kkt=1", "train.epochs=3")
    straight = Trial(cfg)
    while not straight.done:
        straight.step()
    first = Trial(cfg)
    first.step()
    state = first.state_dict()
    resumed = Trial(cfg)
    resumed.load_state_dict(state)
    while not resumed.done:
        resumed.step()
    assert resumed.final_metrics()["loss"] == pytest.approx(straight.final_metrics()["loss"], rel=1e-6)


def test_tv_weight_ramps_up_over_its_epochs(tiny_config):
    # ce 0, tv only: the total loss of an epoch is the epoch's TV weight x its mean TV value
    cfg = tiny_config("loss.ce=0", "loss.bn=0", "loss.tv=0.8", "train.tv_ramp_epochs=4", "train.epochs=5",
                      "train.eval_every=5")
    trial = Trial(cfg)
    rows = [trial.step() for _ in range(5)]
    for epoch, row in enumerate(rows):
        assert row["loss"] == pytest.approx(0.8 * min(1.0, (epoch + 1) / 4) * row["loss_tv"], rel=1e-5), epoch


def test_generator_batch_grows_with_the_training_set(tiny_config):
    cfg = tiny_config("train.batch_per_train_image=0.5")  # n = 200 -> 100 images per step (batch_size 20)
    assert cfg.generator_batch == 100
    trial = Trial(cfg)
    batch = trial.inverter.batch(trial.classifier, trial.terms, trial.rng)
    assert batch.x.shape[0] == 100
    assert tiny_config("train.batch_per_train_image=0.01").generator_batch == 20  # never below batch_size


def test_channels_last_changes_the_layout_not_the_numbers(tiny_config):
    rows, trials = [], []
    for flag in ("false", "true"):
        trial = Trial(tiny_config(f"train.channels_last={flag}", "train.epochs=1"))
        rows.append(trial.step())
        trials.append(trial)
    # the second conv (64 x 32 x 3 x 3): a 1-channel first conv is contiguous in both layouts
    conv_off, conv_on = ([m for m in t.classifier.modules() if isinstance(m, torch.nn.Conv2d)][1] for t in trials)
    assert conv_on.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv_off.weight.is_contiguous(memory_format=torch.channels_last)
    for key in ("loss", "loss_ce", "ssim_nn_train_mean"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-3), key


def test_max_seconds_stops_training_at_the_time_budget(tiny_config):
    # a budget every epoch exceeds: one epoch, evaluated, then done, out of 4
    trial = Trial(tiny_config("train.max_seconds=1e-9", "train.epochs=4", "train.eval_every=4"))
    row = trial.step()
    assert trial.done and trial.epoch == 1 and row["evaluated"] == 1.0
    assert row["train_seconds"] == pytest.approx(trial.train_seconds) and trial.train_seconds > 0
    # a limit reached at epoch 2 of 4 (eval_every 4): that epoch is evaluated, being the last
    late = Trial(tiny_config("train.max_seconds=1e6", "train.epochs=4", "train.eval_every=4"))
    late.step()
    late.cfg.train.max_seconds = 1e-9
    second = late.step()
    assert late.done and late.epoch == 2 and second["evaluated"] == 1.0
    unlimited = Trial(tiny_config("train.max_seconds=0", "train.epochs=2", "train.eval_every=2"))
    unlimited.step()
    assert not unlimited.done  # 0 = epochs alone
    # the clock survives a checkpoint: a resumed trial keeps counting from where it stopped
    resumed = Trial(tiny_config("train.max_seconds=1e-9", "train.epochs=4", "train.eval_every=4"))
    resumed.load_state_dict(trial.state_dict())
    assert resumed.done and resumed.train_seconds == trial.train_seconds


def test_outputs_written_between_evaluations_are_of_the_current_epoch(tiny_config, tmp_path):
    # eval_every 3: epoch 2 is not due; its outputs must not pair epoch 2's images with epoch 1's
    # nearest-image indices, nor label epoch 1's metrics as epoch 2's
    trial = Trial(tiny_config("train.epochs=4", "train.eval_every=3"))
    first = trial.step()
    second = trial.step()
    assert first["evaluated"] == 1.0 and second["evaluated"] == 0.0 and trial.evaluated_epoch == 1
    trial.write_outputs(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["evaluated_epoch"] == 2
    samples = torch.load(tmp_path / "samples.pt", weights_only=False)
    fresh = trial.evaluator(*trial.generate_eval_images())
    assert torch.equal(samples["nearest_train_index"], fresh.nearest_train_index)
    assert metrics["ssim_nn_train_mean"] == pytest.approx(fresh.metrics["ssim_nn_train_mean"])
    # asked to, a step evaluates an epoch that is not due (the sweep asks at every checkpoint epoch)
    third = trial.step(evaluate=True)
    assert third["evaluated"] == 1.0 and trial.evaluated_epoch == 3
