"""The generator's bank of fixed codes G(bank_z): what is scored, the exact and the unbiased KKT
objective over it, its per-code parameters and output, and distillation into it (issue 29, 1-4)."""
import itertools
import json

import pytest
import torch
import yaml
from torch import nn

from harness.config import build_config
from harness.science.classifiers import build_classifier
from harness.science.data import train_subset
from harness.science.inverters import DirectInverter, GeneratorInverter, build_inverter
from harness.science.kkt import kkt_residual, kkt_residual_split, kkt_residual_split_explicit, theta_params
from harness.science.losses import build_loss_terms
from harness.science.metrics import paired_ssim
from harness.trial import Trial
from tests.conftest import tiny_overrides

K = 10
CPU = torch.device("cpu")
MLP = ["classifier.arch=mlp", "classifier.widths=[64,48]", "classifier.norm=none", "classifier.dropout=0"]


def small_classifier(*settings):
    torch.manual_seed(0)
    model = build_classifier(build_config(None, [*MLP, *settings]).classifier).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("arch, margin", [("mlp", "max"), ("mlp", "all"), ("cnn", "all")])
def test_split_residual_gram_form_equals_its_definition(arch, margin):
    """⟨θ − G_A, θ − G_B⟩ / ‖θ‖² by the Gram form equals the formed gradients' inner product, and the
    polarisation identity ⟨a, b⟩ = 2‖(a + b)/2‖² − (‖a‖² + ‖b‖²)/2 of three plain residuals."""
    model = small_classifier() if arch == "mlp" else small_classifier(
        "classifier.arch=cnn", "classifier.depth=1", "classifier.widths=null")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 28, 28, generator=gen)
    y = torch.arange(12) % K
    lam = torch.rand((12, K) if margin == "all" else (12,), generator=gen) * 0.3
    theta = theta_params(model, 0)
    gram = kkt_residual_split(model, theta, x, y, lam, 3.0, 5)
    explicit = kkt_residual_split_explicit(model, theta, x, y, lam, 3.0, 5)
    assert gram.item() == pytest.approx(explicit.item(), rel=1e-4, abs=1e-6)
    a = kkt_residual(model, theta, x[:5], y[:5], lam[:5], 3.0)
    b = kkt_residual(model, theta, x[5:], y[5:], lam[5:], 3.0)
    mean = kkt_residual(model, theta, x, y, lam, 1.5)  # θ − (G_A + G_B) / 2
    assert gram.item() == pytest.approx((2 * mean - (a + b) / 2).item(), rel=1e-4, abs=1e-6)
    grad_x = torch.autograd.grad(kkt_residual_split(model, theta, x.requires_grad_(True), y, lam, 3.0, 5), x)[0]
    assert grad_x[:5].abs().sum() > 0 and grad_x[5:].abs().sum() > 0


@pytest.mark.parametrize("draw", [1, 2])
def test_unbiased_estimate_averages_to_the_full_residual_and_the_minibatch_one_does_not(draw):
    """Over every pair of independent draws of `draw` of M = 4 candidates (scale M/draw), the split
    estimate's mean is the full bank's residual; one draw's own residual is above it by its variance."""
    model = small_classifier()
    gen = torch.Generator().manual_seed(2)
    m = 4
    x, y = torch.randn(m, 1, 28, 28, generator=gen), torch.arange(m) % K
    lam = torch.rand(m, K, generator=gen)
    theta = theta_params(model, 0)
    full = kkt_residual(model, theta, x, y, lam).item()
    subsets = [torch.tensor(s) for s in itertools.combinations(range(m), draw)]
    pairs = [kkt_residual_split(model, theta, x[torch.cat([a, b])], y[torch.cat([a, b])], lam[torch.cat([a, b])],
                                m / draw, draw).item() for a in subsets for b in subsets]
    assert sum(pairs) / len(pairs) == pytest.approx(full, rel=1e-4)
    minibatch = [kkt_residual(model, theta, x[s], y[s], lam[s], m / draw).item() for s in subsets]
    assert sum(minibatch) / len(minibatch) > full * 1.01


def kkt_setup(*settings, classifier=None):
    cfg = build_config(None, ["data.train_size=20", "loss.kkt=1", "loss.kkt_layers=0", "loss.kkt_margin=all",
                              "loss.kkt_codes_per_class_per_100=20", "loss.kkt_min_codes=20", *settings])
    inverter = build_inverter(cfg, CPU)
    classifier = classifier or small_classifier()
    terms = build_loss_terms(cfg.loss, classifier, inverter, cfg.data.train_size, cfg.generator_batch, cfg.seed)
    return cfg, inverter, terms


def test_generator_kkt_takes_the_full_bank_by_default_and_minibatches_only_when_asked():
    _, inverter, terms = kkt_setup()
    kkt = terms["kkt"]
    assert len(inverter.bank_z) == kkt.num_codes == 40  # 2n codes: 20 per class per 100 training images
    assert (kkt.estimator, kkt.batch_size) == ("full", 40)
    _, _, terms = kkt_setup("loss.kkt_estimator=minibatch", "train.batch_size=16")
    assert (terms["kkt"].estimator, terms["kkt"].batch_size) == ("minibatch", 16)
    _, _, terms = kkt_setup("loss.kkt_estimator=unbiased", "train.batch_size=16")
    assert (terms["kkt"].estimator, terms["kkt"].batch_size) == ("unbiased", 8)
    value = terms["kkt"](None)  # the batch is not used: the term draws its own codes
    value.backward()
    assert terms["kkt"].a.grad.abs().sum() > 0


def test_generator_bank_residual_equals_the_direct_inverters_on_the_same_images():
    """kkt_residual_bank: the generator's full-bank residual at its multipliers equals the direct
    inverter's with its bank set to G(bank_z) and the same multipliers (permuted to its class order)."""
    classifier = small_classifier()
    _, gen_inv, gen_terms = kkt_setup(classifier=classifier)
    _, direct, direct_terms = kkt_setup("inverter=direct", "direct.candidates_per_class=4", classifier=classifier)
    with torch.no_grad():
        gen_terms["kkt"].a.uniform_(0.05, 0.6, generator=torch.Generator().manual_seed(3))
        images = gen_inv.kkt_images(torch.arange(40))
        # the direct bank is class-sorted, the generator's codes interleave the classes: code i has label i mod 10
        order = torch.cat([(gen_inv.bank_labels == k).nonzero().squeeze(1) for k in range(K)])
        assert torch.equal(gen_inv.bank_labels[order], direct.labels)
        direct.images.copy_(images[order])
        direct_terms["kkt"].a.copy_(gen_terms["kkt"].a[order])
    generator_value, direct_value = gen_terms["kkt"].bank_residual(), direct_terms["kkt"].bank_residual()
    assert 0 < generator_value < 10
    assert generator_value == pytest.approx(direct_value, abs=1e-5)
    # the full-bank term is that residual plus the (non-negative) λ penalty
    assert gen_terms["kkt"](None).item() >= generator_value - 1e-5


def test_lambda_lr_puts_the_multipliers_in_a_group_of_their_own():
    cfg, inverter, terms = kkt_setup()
    assert len(inverter.make_optimizer(list(terms.parameters())).param_groups) == 1  # the default: one group
    cfg, inverter, terms = kkt_setup("train.lambda_lr=0.05", "train.lr=0.002")
    groups = inverter.make_optimizer(list(terms.parameters())).param_groups
    assert [g["lr"] for g in groups] == [0.002, 0.05]
    assert groups[1]["params"] == [terms["kkt"].a]


@pytest.mark.parametrize("codes", ["learned_z", "embedding"])
def test_per_code_parameters_move_each_code_alone(codes):
    cfg = build_config(None, ["data.train_size=20", f"generator.code_params={codes}"])
    torch.manual_seed(0)
    inverter = GeneratorInverter(cfg, CPU)
    torch.manual_seed(0)
    plain = GeneratorInverter(build_config(None, ["data.train_size=20"]), CPU)
    idx = torch.arange(len(inverter.bank_z))
    with torch.no_grad():  # at the start the codes are the plain bank's
        assert torch.equal(inverter.kkt_images(idx), plain.kkt_images(idx))
    param = inverter.code_z if codes == "learned_z" else inverter.code_map
    assert param.shape[0] == len(inverter.bank_z)
    assert any(p is param for p in inverter.make_optimizer([]).param_groups[0]["params"])
    assert any(name.startswith("code_") for name in inverter.state_dict())
    with torch.no_grad():
        param[3] += 1.0
        moved = inverter.kkt_images(idx)
        still = plain.kkt_images(idx)
    assert not torch.allclose(moved[3], still[3], atol=1e-3)
    assert torch.allclose(torch.cat([moved[:3], moved[4:]]), torch.cat([still[:3], still[4:]]), atol=1e-6)
    # the default keeps the state as it was: no per-code parameters
    assert not any(name.startswith("code_") for name in plain.state_dict())


def test_scaled_tanh_is_origin_plus_scale_tanh_and_the_pixel_term_bounds_the_image():
    origin = torch.linspace(-1, 0.5, 784).reshape(1, 1, 28, 28)
    cfg = build_config(None, ["generator.output=scaled_tanh", "generator.output_scale=1.5", "generator.dropout=0"])
    inverter = GeneratorInverter(cfg, CPU, origin)
    g = inverter.generator.eval()
    last = g.to_image[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(0.7)
    z, c = torch.randn(3, 100), nn.functional.one_hot(torch.tensor([0, 4, 9]), K).float()
    x, bounded = g(z, c, return_pre_tanh=True)
    expected = origin + 1.5 * torch.tanh(torch.tensor(0.7))
    assert torch.allclose(x, expected.expand(3, -1, -1, -1), atol=1e-6)
    assert torch.equal(bounded, x)  # the pixel term sees the image, not the pre-activation
    assert x.max() > 1  # beyond the pixel range: scored clamped
    images, _ = inverter.eval_images()
    assert images.max() <= 1 and images.min() >= -1
    default = GeneratorInverter(build_config(), CPU).generator
    x, pre = default(z, c, return_pre_tanh=True)
    assert torch.allclose(x, torch.tanh(pre))


def test_generator_width_scales_every_layer():
    widths = {}
    for ch in (16, 64):
        g = GeneratorInverter(build_config(None, [f"generator.channels={ch}"]), CPU).generator
        widths[ch] = [m.out_channels for m in g.modules() if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))]
    assert widths[16] == [32, 16, 8, 4, 1] and widths[64] == [128, 64, 32, 16, 1]


def real_targets(count=8):
    train, _ = train_subset(build_config(None, ["data.train_size=100"]).data)
    pick = torch.cat([(train.labels == k).nonzero().squeeze(1)[:1] for k in range(count)])
    return train.images[pick], train.labels[pick]


@pytest.fixture
def one_thread():
    """Small convolutions run faster on one thread than on two contended ones (about 15 s against 45 s here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_distilled_generator_reproduces_its_targets(tmp_path, one_thread):
    """8 real MNIST digits distilled into G(bank_z) (plain codes, no per-code parameters): every
    target's code image reaches SSIM >= 0.9 within a few hundred steps."""
    targets, labels = real_targets(8)
    path = tmp_path / "samples.pt"
    torch.save({"images": targets, "labels": labels}, path)
    cfg = build_config(None, ["data.train_size=100", f"generator.distill_from={path}", "train.distill_steps=400"])
    torch.manual_seed(0)
    inverter = GeneratorInverter(cfg, CPU)
    from harness.science.inverters import load_targets
    loaded, loaded_labels = load_targets(str(path))
    codes = inverter.codes_for(loaded_labels)
    assert torch.equal(inverter.bank_labels[codes], labels)
    with torch.no_grad():
        before = paired_ssim(inverter.kkt_images(codes), targets)
    info = inverter.distill(loaded, codes, cfg.train.distill_steps, cfg.train.distill_ssim)
    with torch.no_grad():
        after = paired_ssim(inverter.kkt_images(codes), targets)
    assert before.max() < 0.5
    assert info["distill_matched_after"] == 1.0 and info["distill_steps_done"] < 400
    assert after.min() >= 0.9


def test_a_trial_scores_the_bank_it_trains_and_logs_the_sample_apart(tmp_path):
    """eval.generator_images: bank: the images the trial scored and saved are exactly G(bank_z) of the
    saved inverter state (rebuilt from the saved config); the sample's measures are logged as sample_*;
    kkt_residual_bank is logged; a distillation's targets are followed at every evaluation."""
    targets, labels = real_targets(4)
    path = tmp_path / "targets.pt"
    torch.save({"images": targets, "labels": labels}, path)
    cfg = build_config(None, tiny_overrides(**{
        "eval.generator_images": "bank", "loss.kkt": 1, "loss.kkt_codes_per_class_per_100": 2.5,
        "loss.kkt_min_codes": 10, "train.epochs": 1, "generator.distill_from": str(path),
        "train.distill_steps": 300, "generator.code_params": "learned_z"}))
    trial = Trial(cfg)
    row = trial.step()
    for key in ("sample_diversity", "sample_evaluator_acc", "sample_target_acc", "kkt_residual_bank",
                "distill_matched_frac", "distill_ssim_mean", "distill_matched_after", "distill_steps_done"):
        assert key in row, key
    assert 0 < row["kkt_residual_bank"] and row["distill_matched_after"] == 1.0
    assert 0 <= row["distill_matched_frac"] <= 1
    out = tmp_path / "run"
    trial.write_outputs(out)
    samples = torch.load(out / "samples.pt", weights_only=True)
    saved = build_config(yaml.safe_load((out / "config.yaml").read_text()))
    rebuilt = GeneratorInverter(saved, CPU, getattr(trial.classifier, "input_mean", None))
    rebuilt.load_state_dict(torch.load(out / "inverter.pt", weights_only=True))
    with torch.no_grad():
        bank = rebuilt.kkt_images(torch.arange(len(rebuilt.bank_z)))
    assert samples["images"].shape == (50, 1, 28, 28)  # M = 2.5 codes per class per 100 x 200 / 100 x 10
    assert torch.equal(samples["images"], bank.clamp(-1, 1))
    assert torch.equal(samples["labels"], torch.arange(50) % K)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sample_diversity"] == row["sample_diversity"]


def test_the_default_trial_scores_the_fresh_latent_sample(tiny_config):
    trial = Trial(tiny_config())
    images, labels = trial.generate_eval_images()
    sample, sample_labels = trial.inverter.sample_images()
    assert torch.equal(images, sample) and torch.equal(labels, sample_labels) and len(images) == 100
    row = trial.step()
    assert {"sample_diversity", "sample_evaluator_acc", "sample_target_acc"} <= set(row)  # the scored set is the sample
    assert "kkt_residual_bank" not in row and "distill_matched_frac" not in row
