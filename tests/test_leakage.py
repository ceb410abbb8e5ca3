"""Per-image leakage, the direct inverter, the KKT condition and the reconstruction classifier
regime, each on a case whose answer is known in advance."""
import math

import pytest
import torch
from torch import nn

from harness.science.classifiers import MLP, build_classifier, classifier_spec, training_state
from harness.config import ConfigError, DataConfig, EvalConfig, build_config
from harness.science.data import NUM_CLASSES, Split, classifier_training_set, heldout_set, train_subset
from harness.science.kkt import fitted_residual, kkt_residual, theta_params
from harness.science.metrics import Evaluator, top_fraction_mean
from harness.trial import Trial
from tests.conftest import tiny_overrides

K = NUM_CLASSES


class BiasFreeLinear(nn.Module):
    """logits = W x (a homogeneous classifier whose KKT condition has a closed form)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], K, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x):
        return self.fc(x.flatten(1)), x.flatten(1)


def test_kkt_residual_of_a_linear_classifier_matches_its_closed_form():
    # m_i = (w_y - w_j) . x_i with j the largest other logit: grad_W m_i = (e_y - e_j) x_i^T
    g = torch.Generator().manual_seed(0)
    d, n = 784, 6
    weight = torch.randn(K, d, generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % K
    lam = torch.rand(n, generator=g)
    model = BiasFreeLinear(weight)
    logits = x.flatten(1) @ weight.T
    other = logits.masked_fill(nn.functional.one_hot(y, K).bool(), -math.inf).argmax(1)
    expected = weight.clone()
    for i in range(n):
        expected[y[i]] -= lam[i] * x[i].flatten()
        expected[other[i]] += lam[i] * x[i].flatten()
    closed_form = (expected.pow(2).sum() / weight.pow(2).sum()).item()
    got = kkt_residual(model, theta_params(model, 0), x, y, lam).item()
    assert got == pytest.approx(closed_form, rel=1e-5)


def test_all_class_kkt_residual_of_a_linear_classifier_matches_its_closed_form():
    # one multiplier per (image, other class): grad_W of (w_y - w_j) . x_i = (e_y - e_j) x_i^T
    g = torch.Generator().manual_seed(2)
    n = 4
    weight = torch.randn(K, 784, generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.tensor([0, 3, 3, 9])
    lam = torch.rand(n, K, generator=g)
    expected = weight.clone()
    for i in range(n):
        for j in range(K):
            if j != y[i]:
                expected[y[i]] -= lam[i, j] * x[i].flatten()
                expected[j] += lam[i, j] * x[i].flatten()
    closed_form = (expected.pow(2).sum() / weight.pow(2).sum()).item()
    model = BiasFreeLinear(weight)
    assert kkt_residual(model, theta_params(model, 0), x, y, lam).item() == pytest.approx(closed_form, rel=1e-5)


def test_fitted_multipliers_reach_the_closed_form_of_orthogonal_images():
    # images on disjoint pixels: the margin gradients g_i = (e_y - e_j) x_i^T are orthogonal, so
    # the best residual over lambda >= 0 is 1 - sum_i max(0, <g_i, W>)^2 / (|g_i|^2 |W|^2), with
    # <g_i, W> = m_i (the margin) and |g_i|^2 = 2 |x_i|^2
    n = 5
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        x.view(n, -1)[i, 10 * i: 10 * i + 10] = 1.0
    y = torch.arange(n)
    weight = 0.03 * torch.randn(K, 784, generator=torch.Generator().manual_seed(1))
    for i in range(n - 1):  # the last image stays misclassified or barely classified: lambda 0 there
        weight[y[i]] += (i + 1) * 0.2 * x[i].flatten()
    logits = x.flatten(1) @ weight.T
    own = logits[torch.arange(n), y]
    other = logits.masked_fill(nn.functional.one_hot(y, K).bool(), -math.inf).max(1).values
    margins = (own - other).clamp(min=0)
    expected = 1 - (margins.pow(2) / 20.0).sum().item() / weight.pow(2).sum().item()
    got = fitted_residual(BiasFreeLinear(weight), x, y, steps=300, lr=0.05, margin="max")  # at 1e-7 by step 200
    assert got == pytest.approx(expected, abs=2e-3)
    assert expected < 0.9  # the case is not trivial: the multipliers explain part of W


def test_top_fraction_mean_known_values():
    assert top_fraction_mean(torch.arange(20.0)) == pytest.approx(18.5)  # best 2 of 20
    assert top_fraction_mean(torch.tensor([0.3, float("nan"), 0.9])) == pytest.approx(0.9)


@pytest.fixture(scope="module")
def reconstruction_trial():
    """A direct-inverter trial on a bias-free MLP (tiny budget; the classifier is not the point)."""
    cfg = build_config(None, tiny_overrides(**{
        "inverter": "direct", "data.train_size": 100, "classifier.arch": "mlp", "classifier.widths": "[64]",
        "classifier.norm": "none", "classifier.bias": "false", "classifier.dropout": 0,
        "classifier.optimizer": "gd", "classifier.steps": 20, "classifier.lr": 0.1,
        "classifier.stationarity_steps": 5, "loss.ce": 0, "loss.bn": 0, "loss.tv": 0, "loss.kkt": 1,
        "loss.pixel": 1, "direct.rescale": "clamp", "train.relu_alpha": 20}))
    return Trial(cfg)


def test_direct_bank_at_the_training_images_recovers_every_training_image(reconstruction_trial):
    trial = reconstruction_trial
    train = trial.train_set
    assert len(trial.inverter.images) == 2 * len(train)  # default: 2n candidates
    with torch.no_grad():  # candidates 0..n-1 of each class = that class's training images
        order = torch.cat([(train.labels == k).nonzero().squeeze(1) for k in range(K)])
        per_class = len(trial.inverter.labels) // K
        for k in range(K):
            members = order[train.labels[order] == k]
            trial.inverter.images[k * per_class: k * per_class + len(members)] = train.images[members]
    metrics = trial.evaluate().metrics
    assert metrics["train_coverage"] == pytest.approx(1.0)
    assert metrics["train_top10"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["heldout_coverage"] < 0.5
    assert metrics["coverage_gap"] == pytest.approx(1.0 - metrics["heldout_coverage"])
    # the gaps are training side minus held-out side: positive when the training images come back
    assert metrics["heldout_top10"] < 0.9
    assert metrics["top10_gap"] == pytest.approx(1.0 - metrics["heldout_top10"], abs=1e-5)
    assert metrics["top10_gap"] > 0.1


def test_direct_trial_trains_candidates_and_multipliers(reconstruction_trial):
    trial = reconstruction_trial
    before = trial.inverter.images.detach().clone()
    lam_before = trial.terms["kkt"].lam.detach().clone()
    row = trial.step()
    assert not torch.equal(before, trial.inverter.images.detach())
    assert not torch.equal(lam_before, trial.terms["kkt"].lam.detach())
    assert trial.terms["kkt"].batch_size == trial.terms["kkt"].num_codes == 2 * len(trial.train_set)
    assert trial.terms["kkt"].layers == 0  # all parameters by default for the direct inverter
    assert math.isfinite(row["loss_kkt"]) and row["evaluated"] == 1.0  # epoch 1 is on every schedule
    for key in ("classifier_train_loss", "classifier_grad_norm", "kkt_residual_train", "kkt_residual_heldout",
                "params_per_train_pixel"):
        assert key in trial.classifier_metrics


class TinyJudge(nn.Module):
    """A stand-in classifier / evaluator for tests of the image metrics (its accuracy is not checked)."""
    num_features = K

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, K)

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return logits, logits


def test_train_and_heldout_sides_have_equal_size_and_balance():
    # N = 5000 asks for 500 per class; the held-out half of MNIST's test split has fewer of some
    # classes, so both sides are capped at the same count per class
    train, _ = train_subset(DataConfig(train_size=5000))
    held = heldout_set(DataConfig(), 500)
    available = min(int((held.labels == k).sum()) for k in range(K))
    assert available < 500
    judge = TinyJudge().eval()
    refs = {"ref_heldout_diversity": 0.8}
    ev = Evaluator(EvalConfig(topk=3, diversity_pairs=10), train, held, judge, judge, refs)
    train_side = train.labels[ev.train_side_index]
    for k in range(K):
        assert int((train_side == k).sum()) == int((ev.heldout.labels == k).sum()) == available
    # candidates = the held-out side itself: every held-out image is found, as a known answer
    evaluation = ev(ev.heldout.images, ev.heldout.labels)
    assert evaluation.metrics["heldout_coverage"] == pytest.approx(1.0)
    assert evaluation.metrics["heldout_top10"] == pytest.approx(1.0, abs=1e-5)
    # held-out images given back score a negative gap: the other side of the sign
    assert evaluation.metrics["top10_gap"] == pytest.approx(evaluation.metrics["train_top10"] - 1.0, abs=1e-5)
    assert evaluation.metrics["top10_gap"] < -0.1 and evaluation.metrics["coverage_gap"] < -0.05
    assert len(evaluation.train_side[1]) == len(evaluation.heldout_side[0]) == available * K
    # candidates = training images beyond the cap: all found among the N training images, not all
    # on the capped side; the gap compares the two equal sides, never all N against the held-out side
    beyond = torch.ones(len(train), dtype=torch.bool)
    beyond[ev.train_side_index] = False
    extra = ev(train.images[beyond][:200], train.labels[beyond][:200]).metrics
    assert extra["ssim_nn_train_mean"] == pytest.approx(1.0)
    assert extra["ssim_nn_train_side_mean"] < 0.95  # the gap's known answer: the test below


def test_memorization_gap_compares_the_capped_training_side_with_the_heldout_side():
    """Constant images, whose SSIM has a closed form: (2ab + C1) / (a² + b² + C1), C1 = (0.01 · 2)²,
    the structure term 1. Per class, training images at 0.25 and 0.5 and one held-out image at −0.5:
    both sides are capped at one image per class, the training side being the first (0.25). The
    candidates, at 0.5, are training images beyond the cap."""
    c1 = (0.01 * 2.0) ** 2

    def ssim(a, b):
        return (2 * a * b + c1) / (a * a + b * b + c1)

    def constant(levels):
        return Split(torch.tensor(levels * K, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 28, 28).clone(),
                     torch.arange(K).repeat_interleave(len(levels)))

    train, held, candidates = constant([0.25, 0.5]), constant([-0.5]), constant([0.5])
    judge = TinyJudge().eval()
    ev = Evaluator(EvalConfig(topk=3, diversity_pairs=10), train, held, judge, judge, {"ref_heldout_diversity": 0.8})
    assert ev.capped and ev.side_per_class == 1
    m = ev(candidates.images, candidates.labels).metrics
    assert m["ssim_nn_train_mean"] == pytest.approx(1.0, abs=1e-4)  # every candidate is a training image
    assert m["ssim_nn_train_side_mean"] == pytest.approx(ssim(0.5, 0.25), abs=1e-4)  # 0.8003
    assert m["ssim_nn_test_mean"] == pytest.approx(ssim(0.5, -0.5), abs=1e-4)  # -0.9984
    assert m["memorization_gap"] == pytest.approx(ssim(0.5, 0.25) - ssim(0.5, -0.5), abs=2e-4)  # 1.7987


def test_negative_control_subset_is_disjoint_and_balanced():
    cfg = DataConfig(train_size=200, classifier_subset="disjoint")
    scored, _ = train_subset(cfg)
    seen = classifier_training_set(cfg)
    assert len(seen) == 200 and all(int((seen.labels == k).sum()) == 20 for k in range(K))
    flat = {tuple(v.tolist()) for v in scored.images.flatten(1).to(torch.int16)}
    assert not any(tuple(v.tolist()) in flat for v in seen.images.flatten(1).to(torch.int16))
    same = classifier_training_set(DataConfig(train_size=200))
    assert torch.equal(same.images, scored.images)


@pytest.mark.parametrize("option", [
    "classifier.norm=none", "classifier.bias=false", "classifier.activation=relu", "classifier.init_scale=0.1",
    "classifier.optimizer=gd", "classifier.steps=10", "classifier.warmup_steps=10", "classifier.momentum=0.5", "classifier.weight_decay=0.001",
    "classifier.widths=[100]", "classifier.dropout=0", "classifier.center=true", "data.classifier_subset=disjoint",
    "classifier.channels=[32,125]",
])
def test_each_classifier_option_changes_the_cache_key(option):
    from harness.cache import content_key
    assert content_key(classifier_spec(build_config(None, [option]))) != content_key(classifier_spec(build_config()))


def test_cnn_channels_set_each_block_and_match_the_parameter_count_by_hand():
    cfg = build_config(None, ["classifier.arch=cnn", "classifier.depth=2", "classifier.channels=[32,125]",
                              "classifier.bias=false", "classifier.norm=none"])
    model = build_classifier(cfg.classifier)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 125]
    # 1·32·9 + 32·125·9 + (125·7·7)·256 + 256·10 = 288 + 36,000 + 1,568,000 + 2,560
    assert sum(p.numel() for p in model.parameters()) == 1_606_848
    with pytest.raises(ConfigError, match="classifier.channels: give one positive channel count per conv block"):
        build_config(None, ["classifier.depth=2", "classifier.channels=[32]"])


def test_init_scale_scales_the_first_layer_only():
    base = build_config(None, ["classifier.arch=mlp", "classifier.widths=[32,32]"]).classifier
    small = base.model_copy(update={"init_scale": 0.1})
    torch.manual_seed(0)
    a = build_classifier(base)
    torch.manual_seed(0)
    b = build_classifier(small)
    layers_a = [m for m in a.modules() if isinstance(m, nn.Linear)]
    layers_b = [m for m in b.modules() if isinstance(m, nn.Linear)]
    assert torch.allclose(layers_b[0].weight, 0.1 * layers_a[0].weight)
    assert torch.equal(layers_b[1].weight, layers_a[1].weight)


def test_training_state_of_a_zero_model_is_the_closed_form():
    # W = 0: loss log K, accuracy of predicting class 0 (argmax of equal logits), gradient
    # (p - e_y) x^T averaged over the batch
    model = MLP(widths=[8], norm="none", bias=False, dropout=0)
    for p in model.parameters():
        nn.init.zeros_(p)
    x = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % K
    state = training_state(model, Split(x, y), weight_decay=0.0, device="cpu")
    assert state["train_loss"] == pytest.approx(math.log(K))
    assert state["train_acc"] == pytest.approx(0.1)
    assert state["grad_norm"] == pytest.approx(0.0)  # every path through a zero ReLU layer is dead


def test_nearest_ssim_on_the_trial_device_matches_the_cpu():
    # runs on whatever device is present (a GPU when there is one): the same numbers as the CPU
    from harness.science.metrics import nearest_ssim
    from harness.trial import resolve_device

    train, _ = train_subset(DataConfig(train_size=200))
    held = heldout_set(DataConfig(), 10)
    device = resolve_device("auto")
    on_device, index_device = nearest_ssim(held, train, 5, device)
    on_cpu, index_cpu = nearest_ssim(held, train, 5, "cpu")
    assert on_device.device.type == "cpu" and torch.allclose(on_device, on_cpu, atol=1e-5)
    assert torch.equal(index_device, index_cpu)


def test_direct_trial_resumes_exactly_from_its_checkpoint(reconstruction_trial):
    import io

    cfg = reconstruction_trial.cfg.model_copy(update={"train": reconstruction_trial.cfg.train.model_copy(
        update={"jitter": 2, "epochs": 2})})
    straight = Trial(cfg)
    straight.step()
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    straight.step()
    resumed = Trial(cfg)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=False))
    resumed.step()
    assert torch.equal(straight.inverter.images, resumed.inverter.images)  # the bank, jitter draws included
    assert torch.equal(straight.terms["kkt"].a, resumed.terms["kkt"].a)  # the multipliers
    assert straight.history[-1]["loss"] == resumed.history[-1]["loss"]


def test_a_classifier_left_at_chance_level_is_refused(tmp_path):
    # gradient descent at an absurd learning rate diverges: the harness must not invert what is left
    from harness.science.classifiers import ClassifierDidNotTrain, pretrained_classifier

    cfg = build_config(None, ["data.train_size=20", "classifier.arch=mlp", "classifier.widths=[16]",
                              "classifier.optimizer=gd", "classifier.steps=5", "classifier.lr=1e6",
                              "classifier.stationarity_steps=0", f"cache_dir={tmp_path}"])
    with pytest.raises(ClassifierDidNotTrain, match="classifier.lr"):
        pretrained_classifier(cfg, torch.device("cpu"))


def test_stationarity_diagnostic_runs_by_default_only_in_the_reconstruction_regime():
    assert build_config().classifier.stationarity_budget == 0  # adam: the study's classifiers
    assert build_config(None, ["classifier.optimizer=gd"]).classifier.stationarity_budget == 200
    assert build_config(None, ["classifier.optimizer=gd", "classifier.stationarity_steps=7"]).classifier.stationarity_budget == 7


def test_gd_warmup_scales_the_first_steps_learning_rate():
    from harness.science.classifiers import fit_gd, warmup_lr
    from harness.science.data import Split
    assert [warmup_lr(s, 0.1, 4) for s in (0, 1, 3, 10)] == pytest.approx([0.025, 0.05, 0.1, 0.1])
    assert warmup_lr(0, 0.1, 0) == 0.1
    # one plain gd step (no momentum, no weight decay) moves every weight by -lr/warmup · gradient
    torch.manual_seed(0)
    model = MLP(widths=[8], norm="none", bias=False, dropout=0)
    data = Split(torch.randn(20, 1, 28, 28), torch.arange(20) % K)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(data.images)[0], data.labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    fit_gd(model, data, steps=1, lr=0.5, momentum=0.0, weight_decay=0.0, device="cpu", warmup_steps=10)
    for p, p0, g in zip(model.parameters(), before, grads):
        assert torch.allclose(p.detach(), p0 - 0.05 * g, atol=1e-7)


def test_centered_classifier_sees_its_input_minus_the_training_mean():
    c = build_config(None, ["classifier.arch=mlp", "classifier.widths=[16]", "classifier.center=true",
                            "classifier.dropout=0", "classifier.norm=none"]).classifier
    mean = torch.full((1, 28, 28), 0.25)
    torch.manual_seed(0)
    model = build_classifier(c, mean).eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(model(x)[0], model.model(x - 0.25)[0])
    # the mean is saved with the weights (a buffer), and is no parameter θ of the KKT condition
    assert torch.equal(model.state_dict()["input_mean"], mean.reshape(1, 1, 28, 28))
    assert not any("input_mean" in name for name, _ in model.named_parameters())
    plain = build_classifier(c.model_copy(update={"center": False}))
    assert not hasattr(plain, "input_mean")


def test_direct_bank_starts_at_the_origin_it_is_given():
    from harness.science.inverters import build_inverter
    cfg = build_config(None, ["inverter=direct", "data.train_size=100", "direct.init_scale=0.01"])
    origin = torch.linspace(-1, 1, 784).reshape(1, 1, 28, 28)
    plain = build_inverter(cfg, torch.device("cpu"))
    moved = build_inverter(cfg, torch.device("cpu"), origin)
    assert torch.allclose(moved.images - plain.images, origin.expand_as(plain.images))
    assert plain.images.std().item() == pytest.approx(0.01, rel=0.05)


def test_stretch_to_range_undoes_a_scaled_deviation_from_the_origin():
    from harness.science.inverters import stretch_to_range
    gen = torch.Generator().manual_seed(0)
    origin = torch.rand(1, 1, 28, 28, generator=gen) * 1.6 - 0.9
    t = (torch.rand(4, 1, 28, 28, generator=gen) > 0.7).float() * 2 - 1  # pixels at ±1, like MNIST
    c = torch.tensor([0.05, 0.3, 1.0, 3.0]).view(4, 1, 1, 1)
    assert torch.allclose(stretch_to_range(origin + c * (t - origin), origin), t, atol=1e-5)
    # a faint pixel left over from the initial noise, pointing at a bound it nearly touches, does
    # not fix the stretch (it is below `significant` x the largest deviation)
    x = origin + 0.3 * (t - origin)
    x[:, 0, 0, 0] = origin[0, 0, 0, 0] + 1e-4 * torch.sign(t[:, 0, 0, 0])
    assert torch.allclose(stretch_to_range(x, origin)[:, :, 1:], t[:, :, 1:], atol=1e-4)


def test_centred_classifier_with_range_rescale_scores_a_scaled_training_bank_as_recovered():
    cfg = build_config(None, tiny_overrides(**{
        "inverter": "direct", "data.train_size": 100, "classifier.arch": "mlp", "classifier.widths": "[32]",
        "classifier.norm": "none", "classifier.bias": "false", "classifier.dropout": 0, "classifier.center": "true",
        "classifier.optimizer": "gd", "classifier.steps": 5, "classifier.lr": 0.1, "classifier.warmup_steps": 2,
        "classifier.stationarity_steps": 2, "loss.ce": 0, "loss.bn": 0, "loss.tv": 0, "loss.kkt": 1,
        "direct.rescale": "range"}))
    trial = Trial(cfg)
    origin = trial.classifier.input_mean
    assert torch.allclose(origin, trial.train_set.images.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(trial.inverter.images.mean(0, keepdim=True), origin, atol=0.05)  # the bank starts there
    train = trial.train_set
    per_class = len(trial.inverter.labels) // K
    with torch.no_grad():  # each class's candidates = origin + 0.2 (its training images − origin)
        for k in range(K):
            members = train.images[train.labels == k]
            trial.inverter.images[k * per_class: k * per_class + len(members)] = origin + 0.2 * (members - origin)
    metrics = trial.evaluate().metrics
    assert metrics["train_coverage"] == pytest.approx(1.0)
    assert metrics["train_top10"] == pytest.approx(1.0, abs=1e-4)
    trial.cfg.direct.rescale = "minmax"  # min-max in image space leaves the mean blended in
    assert trial.evaluate().metrics["train_top10"] < 0.99


def _mnist_like_origin_and_targets(gen, n=100):
    """Targets at ±1 (strokes on a third of the pixels) that are all −1 on a background of 270
    pixels, and their mean image as the origin: exactly −1 there, as MNIST's mean image is."""
    background = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    background.view(-1)[:270] = True
    t = ((torch.rand(n, 1, 28, 28, generator=gen) > 0.7).float() * 2 - 1).masked_fill(background, -1.0)
    return t.mean(0, keepdim=True), t, background


def test_stretch_ignores_a_pixel_with_no_room_at_the_bound():
    from harness.science.inverters import stretch_factor, stretch_to_range
    gen = torch.Generator().manual_seed(1)
    origin, t, background = _mnist_like_origin_and_targets(gen)
    t = t[:1]
    x = origin + 0.3 * (t - origin)
    x.view(-1)[0] = -1.12  # one background pixel pushed below the bound its origin sits on
    assert background.view(-1)[0]
    assert stretch_factor(x, origin).item() == pytest.approx(1 / 0.3, rel=1e-5)
    assert torch.allclose(stretch_to_range(x, origin).clamp(-1, 1), t, atol=1e-5)


def test_stretch_of_noisy_reconstructions_keeps_them_recognisable():
    from harness.science.inverters import stretch_factor
    from harness.science.metrics import paired_ssim
    gen = torch.Generator().manual_seed(2)
    origin, t, _ = _mnist_like_origin_and_targets(gen)
    x = origin + 0.3 * (t - origin) + 0.05 * torch.randn(t.shape, generator=gen)
    s = stretch_factor(x, origin)
    # noise adds to the small deviations, so the stretch falls short of 1/0.3; it never nears 0,
    # which would leave the mean image (SSIM 0.17 against these targets)
    assert s.min().item() > 0.55 / 0.3 and s.max().item() < 1.0 / 0.3
    stretched = (origin + s[:, None, None, None] * (x - origin)).clamp(-1, 1)
    assert paired_ssim(stretched, t).min().item() > 0.7
    assert paired_ssim(origin.expand_as(t), t).mean().item() < 0.2


def test_stretch_of_noisy_reconstructions_of_real_mnist_digits_never_gives_the_mean_image():
    """The real MNIST n = 100 training images, their mean as the origin (438 of 784 pixels within
    0.1 of −1), each candidate 0.3 x its image's deviation plus noise σ 0.05: every stretched
    candidate stays its digit (SSIM > 0.5, median > 0.7), where the mean image scores 0.12. A
    stretch fixed by the smallest ratio over all pixels (no_room 0, outliers 0) shrinks 90 of 100 to
    s < 0.01, the mean image; the earlier defaults (0.02, 0.02) left 20 below SSIM 0.3."""
    from harness.science.inverters import stretch_factor, stretch_to_range
    from harness.science.metrics import paired_ssim
    t = train_subset(DataConfig(train_size=100))[0].images
    origin = t.mean(0, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    x = origin + 0.3 * (t - origin) + 0.05 * torch.randn(t.shape, generator=gen)
    q = paired_ssim(stretch_to_range(x, origin).clamp(-1, 1), t)
    assert q.min().item() > 0.5 and q.median().item() > 0.7
    assert paired_ssim(origin.expand_as(t), t).mean().item() == pytest.approx(0.12, abs=0.01)
    assert (stretch_factor(x, origin, no_room=0.0, outliers=0.0) < 0.01).sum().item() >= 90
    old = stretch_factor(x, origin, no_room=0.02, outliers=0.02)
    q_old = paired_ssim((origin + old[:, None, None, None] * (x - origin)).clamp(-1, 1), t)
    assert (q_old < 0.3).sum().item() >= 15


def test_stretch_leaves_an_image_without_significant_pixels_alone():
    from harness.science.inverters import stretch_factor
    origin = torch.full((1, 1, 28, 28), -1.0)
    x = origin - 0.01  # every pixel points below a bound it already sits on: no room anywhere
    assert stretch_factor(x, origin).item() == 1.0
    assert stretch_factor(origin.clone(), origin).item() == 1.0  # no deviation at all


def test_coverage_of_each_side_is_the_fraction_at_its_bar():
    # one all-black candidate per class: each real image's best SSIM is its SSIM against black,
    # computed here pair by pair; each side's coverage at a bar is the fraction of those at or
    # above it, at the usual bar and at the strict one alike
    from harness.science.metrics import paired_ssim
    train, _ = train_subset(DataConfig(train_size=200))
    held = heldout_set(DataConfig(), 20)
    black = torch.full((K, 1, 28, 28), -1.0)
    labels = torch.arange(K)
    judge = TinyJudge().eval()
    v_train = paired_ssim(train.images, black[train.labels])
    v_held = paired_ssim(held.images, black[held.labels])
    def between(values, q):  # halfway between two neighbouring values: no image sits at the bar
        ordered = values.sort().values
        k = int(q * len(ordered))
        return (ordered[k] + ordered[k + 1]).item() / 2
    bar, strict = between(v_held, 0.5), between(v_train, 0.75)
    ev = Evaluator(EvalConfig(topk=3, diversity_pairs=10, recon_threshold=bar, strict_threshold=strict),
                   train, held, judge, judge, {"ref_heldout_diversity": 0.8})
    m = ev(black, labels).metrics
    assert m["heldout_coverage"] == pytest.approx((v_held >= bar).float().mean().item(), abs=1e-6)
    assert m["train_coverage"] == pytest.approx((v_train >= bar).float().mean().item(), abs=1e-6)
    assert m["heldout_coverage_strict"] == pytest.approx((v_held >= strict).float().mean().item(), abs=1e-6)
    assert m["train_coverage_strict"] == pytest.approx((v_train >= strict).float().mean().item(), abs=1e-6)
    assert m["coverage_gap"] == pytest.approx(m["train_coverage"] - m["heldout_coverage"])
    assert m["coverage_gap_strict"] == pytest.approx(m["train_coverage_strict"] - m["heldout_coverage_strict"])
    assert 0 < m["heldout_coverage"] < 1 and 0 < m["train_coverage_strict"] < 1


def test_disjoint_centring_set_holds_no_training_or_control_image():
    from harness.science.classifiers import centring_mean
    from harness.science.data import centring_set
    cfg = DataConfig(train_size=100)
    train, used = train_subset(cfg)
    control = classifier_training_set(cfg.model_copy(update={"classifier_subset": "disjoint"}))
    centre = centring_set(cfg)
    assert len(centre) == 1000 and all(int((centre.labels == k).sum()) == 100 for k in range(K))
    flat = lambda s: {tuple(row.tolist()) for row in (s.images.flatten(1) * 127.5).round().to(torch.int16)}
    assert not flat(centre) & flat(train) and not flat(centre) & flat(control)
    own = build_config(None, ["data.train_size=100", "classifier.center=true"])
    disjoint = build_config(None, ["data.train_size=100", "classifier.center=true", "classifier.center_mean=disjoint"])
    assert torch.allclose(centring_mean(own, train), train.images.mean(0))
    assert torch.allclose(centring_mean(disjoint, train), centre.images.mean(0))
    # the default leaves the cache key as it was before the setting existed; the other changes it
    assert "center_mean" not in classifier_spec(own)["classifier"]
    assert classifier_spec(disjoint)["classifier"]["center_mean"] == "disjoint"
    # without centring the setting changes nothing, and is not in the key either
    uncentred = build_config(None, ["data.train_size=100", "classifier.center_mean=disjoint"])
    assert "center_mean" not in classifier_spec(uncentred)["classifier"]


def test_disjoint_centring_set_fits_up_to_its_largest_training_size():
    from harness.config import ConfigError
    from harness.science.data import centring_set
    # MNIST's smallest class (5,421 fives) holds 2 x 2,660 + 100 at n = 26,600, and 2 x 2,661 + 99 beyond
    largest = build_config(None, ["data.train_size=26600", "classifier.center=true", "classifier.center_mean=disjoint"])
    assert len(centring_set(largest.data)) == 1000
    with pytest.raises(ConfigError, match="data.train_size <= 26600"):
        build_config(None, ["data.train_size=26610", "classifier.center=true", "classifier.center_mean=disjoint"])
    build_config(None, ["data.train_size=26610", "classifier.center_mean=disjoint"])  # not centred: no centring set


@pytest.mark.parametrize("arch, margin, layers", [
    ("mlp", "all", 0),    # the positive control's classifier: every layer by the Gram form
    ("mlp", "max", 1),    # the max-other-class margin, the last layer only
    ("cnn", "all", 0),    # a conv layer formed explicitly beside two Linear layers by the Gram form
    ("cnn_bias", "all", 0),  # with biases: the bias part ‖b − Σ D‖² beside the Gram form
    # the hand-written backward pass (kkt_residual_chain) through each layer it knows
    ("cnn_max", "max", 0),   # max pooling: the gradient routed to each window's largest input
    ("cnn_max", "all", 2),   # the last two layers only: the backward pass stops at the first chosen one
    ("cnn_leaky", "all", 3),  # LeakyReLU, 2 blocks, the second convolution the first chosen layer
    ("cnn_hard", "all", 0),  # the unsmoothed ReLU (α = 0): its derivative a step
    ("mlp_bias", "max", 0),
])
def test_kkt_residual_gram_form_equals_its_definition(arch, margin, layers):
    """The Linear layers' part of ‖θ − G‖² taken from the activations (‖W‖² − 2 Σ D∘Z + Σ (DDᵀ)∘(HHᵀ))
    equals the residual with every gradient G formed by autograd: value and gradients with respect
    to the candidates and the multipliers, to float rounding."""
    from harness.science.classifiers import smoothed_relu
    from harness.science.kkt import kkt_residual_chain, kkt_residual_explicit
    settings = {"mlp": ["classifier.arch=mlp", "classifier.widths=[64,32]", "classifier.bias=false"],
                "cnn": ["classifier.arch=cnn", "classifier.depth=1", "classifier.bias=false"],
                "cnn_bias": ["classifier.arch=cnn", "classifier.depth=2", "classifier.bias=true"],
                "cnn_max": ["classifier.arch=cnn", "classifier.depth=2", "classifier.pool=max", "classifier.bias=false"],
                "cnn_leaky": ["classifier.arch=cnn", "classifier.depth=2", "classifier.activation=leaky_relu",
                              "classifier.bias=true", "classifier.center=true"],
                "cnn_hard": ["classifier.arch=cnn", "classifier.depth=1", "classifier.bias=false"],
                "mlp_bias": ["classifier.arch=mlp", "classifier.widths=[64,32]", "classifier.bias=true"]}[arch]
    activation = [] if any(s.startswith("classifier.activation") for s in settings) else ["classifier.activation=relu"]
    cfg = build_config(None, [*settings, "classifier.norm=none", "classifier.dropout=0", *activation])
    torch.manual_seed(0)
    model = build_classifier(cfg.classifier).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = (0.3 * torch.randn(12, 1, 28, 28)).requires_grad_(True)
    y = torch.arange(12) % K
    a = torch.rand(12, K) if margin == "all" else torch.rand(12)
    a.requires_grad_(True)
    if arch != "mlp":  # nonzero biases, of the weights' size, so that their part of the residual counts
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                    m.bias.copy_(m.weight.abs().mean() * torch.randn(m.bias.shape).sign())
    assert kkt_residual_chain(model, theta_params(model, layers), x, y, a.pow(2)) is not None  # the chain is taken
    out = []
    with smoothed_relu(model, 0.0 if arch == "cnn_hard" else 50.0):
        for fn in (kkt_residual, kkt_residual_explicit):
            r = fn(model, theta_params(model, layers), x, y, a.pow(2), 2.5)
            out.append((r.item(), *torch.autograd.grad(r, [x, a])))
    (r_gram, gx_gram, ga_gram), (r_def, gx_def, ga_def) = out
    assert r_def > 0.01
    assert r_gram == pytest.approx(r_def, rel=1e-5)
    assert torch.allclose(gx_gram, gx_def, rtol=1e-4, atol=1e-4 * gx_def.abs().max().item())
    assert torch.allclose(ga_gram, ga_def, rtol=1e-4, atol=1e-4 * ga_def.abs().max().item())


def _kkt_residual_by_definition(model, theta, x, y, lam, scale):
    """‖θ − scale · ∇_θ Σ_i λ_i m_i‖² / ‖θ‖² written out here, independently of harness.science.kkt:
    m_i the own logit minus the largest other one (λ of shape (n,)), or one term per other class j,
    λ_ij (own − j) (λ of shape (n, K); the own-class entry multiplies own − own = 0)."""
    from torch.func import functional_call
    logits, _ = functional_call(model, theta, (x,))
    own = logits[torch.arange(len(y)), y]
    if lam.dim() == 1:
        others = logits.masked_fill(nn.functional.one_hot(y, K).bool(), -math.inf)
        weighted = (lam * (own - others.max(1).values)).sum()
    else:
        weighted = (lam * (own[:, None] - logits)).sum()
    params = list(theta.values())
    grads = torch.autograd.grad(scale * weighted, params, create_graph=True)
    return sum((p - g).pow(2).sum() for p, g in zip(params, grads)) / sum(p.pow(2).sum() for p in params)


@pytest.mark.parametrize("margin, bias, layers, rows, by_gram", [
    # the max margin (loss.kkt_margin: max, the default) through the hidden layers; the head (32 x 10)
    # is formed explicitly at 12 candidates
    ("max", False, 0, 12, {"model.body.1", "model.body.3"}),
    # a head layer by the Gram form: 4 candidates x (32 + 10) < 32 x 10
    ("max", False, 1, 4, {"model.head"}),
    ("all", False, 1, 4, {"model.head"}),
    # layers with bias, the head among them, by the Gram form (the bias part ‖b − Σ_i D_i‖²)
    ("max", True, 0, 4, {"model.body.1", "model.body.3", "model.head"}),
    ("all", True, 1, 4, {"model.head"}),
    # a hidden layer with bias by the Gram form, its head formed explicitly
    ("all", True, 2, 12, {"model.body.3"}),
])
def test_kkt_residual_gram_form_equals_its_definition_where_used(margin, bias, layers, rows, by_gram):
    """The Gram form on the cases it serves (the max margin, a head layer, layers with bias), on a
    tiny centred MLP: the residual, and its gradients with respect to the candidates and the
    multipliers, equal those of the residual formed by its definition (written out in this test)."""
    from harness.science.classifiers import smoothed_relu
    cfg = build_config(None, ["classifier.arch=mlp", "classifier.widths=[64,32]", f"classifier.bias={str(bias).lower()}",
                              "classifier.norm=none", "classifier.dropout=0", "classifier.activation=relu",
                              "classifier.center=true"])
    torch.manual_seed(3)
    model = build_classifier(cfg.classifier, 0.1 * torch.randn(1, 28, 28)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if bias:  # nonzero biases, of the weights' size, so that their part of the residual counts
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.copy_(m.weight.abs().mean() * torch.randn(m.out_features).sign())
    x = (0.5 * torch.randn(rows, 1, 28, 28)).requires_grad_(True)
    y = torch.arange(rows) % K
    a = (torch.rand(rows, K) if margin == "all" else torch.rand(rows)).requires_grad_(True)
    out = []
    with smoothed_relu(model, 20.0):
        # the scale at which ‖scale · G‖ = ‖θ‖, so that neither side of θ − scale · G dominates:
        # r(s) + r(−s) = 2 + 2 s² ‖G‖² / ‖θ‖²
        ends = [_kkt_residual_by_definition(model, theta_params(model, layers), x, y, a.pow(2), s).item()
                for s in (1.0, -1.0)]
        scale = (sum(ends) / 2 - 1) ** -0.5
        for fn in (kkt_residual, _kkt_residual_by_definition):
            theta = theta_params(model, layers)
            r = fn(model, theta, x, y, a.pow(2), scale)
            grads = torch.autograd.grad(r, [x, a, *theta.values()], allow_unused=True)
            out.append((r.item(), grads[0], grads[1]))
            if fn is kkt_residual:  # the Gram form takes no gradient with respect to W: W is not in its graph
                gram = {name.rsplit(".", 1)[0] for name, g in zip(theta, grads[2:]) if g is None}
                assert gram == by_gram
    (r_gram, gx_gram, ga_gram), (r_def, gx_def, ga_def) = out
    assert r_def > 0.05 and abs(r_def - 1) > 0.05  # the multipliers' side counts, and does not cancel θ
    assert r_gram == pytest.approx(r_def, rel=1e-5)
    assert torch.allclose(gx_gram, gx_def, rtol=1e-4, atol=1e-4 * gx_def.abs().max().item())
    assert torch.allclose(ga_gram, ga_def, rtol=1e-4, atol=1e-4 * ga_def.abs().max().item())


def test_stretch_skips_non_finite_pixels():
    from harness.science.inverters import stretch_factor
    gen = torch.Generator().manual_seed(1)
    origin, t, _ = _mnist_like_origin_and_targets(gen)
    x = origin + 0.3 * (t[:1] - origin)
    clean = stretch_factor(x, origin).item()
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y.view(-1)[400] = bad
        assert stretch_factor(y, origin).item() == pytest.approx(clean, rel=1e-5) == pytest.approx(1 / 0.3, rel=1e-5)


class SharedLinear(nn.Module):
    """logits = C relu(A relu(A x')) with one Linear module A called twice (x' = the first 64 pixels)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64, bias=False)
        self.c = nn.Linear(64, K, bias=False)

    def forward(self, x):
        h = x.flatten(1)[:, :64]
        h = torch.relu(self.a(torch.relu(self.a(h))))
        return self.c(h), h


def test_kkt_residual_of_a_layer_called_twice_equals_its_definition():
    """A module called twice has a gradient summed over both calls, which the Gram form cannot
    take from one call's activations: the residual is then formed as its definition."""
    from harness.science.kkt import kkt_residual_explicit
    torch.manual_seed(0)
    model = SharedLinear().eval()
    x = torch.randn(4, 1, 28, 28)
    y = torch.arange(4) % K
    lam = torch.rand(4, K)
    expected = kkt_residual_explicit(model, theta_params(model, 0), x, y, lam, 2.0).item()
    assert expected > 0.01
    assert kkt_residual(model, theta_params(model, 0), x, y, lam, 2.0).item() == pytest.approx(expected, rel=1e-5)


class _Fixed(nn.Module):
    """A 'generator' that returns fixed images whatever it is asked."""

    def __init__(self, images):
        super().__init__()
        self.register_buffer("images", images)

    def forward(self, z, c):
        return self.images[:len(z)]


@pytest.mark.parametrize("rescale", ["none", "range"])
def test_generator_range_rescale_scores_a_scaled_training_image_as_that_image(rescale):
    """generator.rescale: range stretches each evaluation image about the classifier's input mean
    (origin + 0.3·(t − origin) gives t back); none scores it as generated."""
    from harness.science.inverters import GeneratorInverter
    gen = torch.Generator().manual_seed(3)
    origin, t, _ = _mnist_like_origin_and_targets(gen, n=20)
    cfg = build_config(None, ["eval.per_class=2", f"generator.rescale={rescale}"])
    inverter = GeneratorInverter(cfg, torch.device("cpu"), origin)
    scaled = origin + 0.3 * (t - origin)
    inverter.generator = _Fixed(scaled)
    images, labels = inverter.eval_images()
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == [c for c in range(K) for _ in range(2)]
    expected = t if rescale == "range" else scaled
    assert torch.allclose(images, expected, atol=1e-5)
