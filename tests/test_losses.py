"""Each loss term on hand-built inputs whose value is known in closed form."""
import math

import pytest
import torch
from torch import nn

from harness.config import LossConfig, build_config
from harness.science.inverters import GeneratorInverter
from harness.science.losses import LOSS_TERMS, GeneratedBatch, build_loss_terms

K = 10


class LinearClassifier(nn.Module):
    """logits = W x + b with W = 0, b = 0; features = the flattened image."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(28 * 28, K)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        feats = x.flatten(1)
        return self.fc(feats), feats


def generator_inverter():
    return GeneratorInverter(build_config(), torch.device("cpu"))


def term(name, classifier=None, **options):
    cfg = LossConfig(**options)
    classifier = classifier or LinearClassifier()
    return LOSS_TERMS[name](cfg, classifier, generator_inverter(), 1000, 8, 0)


def batch(x=None, logits=None, features=None, y=None, c=None, pre_tanh=None, z=None):
    b = 4
    x = torch.zeros(b, 1, 28, 28) if x is None else x
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    c = nn.functional.one_hot(y, K).float() if c is None else c
    logits = torch.zeros(len(x), K) if logits is None else logits
    features = torch.ones(len(x), 3) if features is None else features
    return GeneratedBatch(x, x if pre_tanh is None else pre_tanh, c, y, logits, features, z)


def test_ce_of_uniform_logits_is_log_k():
    assert term("ce")(batch()).item() == pytest.approx(math.log(K))


def test_kl_equals_ce_under_hot_conditioning_and_zero_when_c_is_p():
    logits = torch.randn(4, K)
    y = logits.argmax(1)
    b = batch(logits=logits, y=y)
    assert term("kl")(b).item() == pytest.approx(term("ce")(b).item(), abs=1e-5)
    assert term("kl")(batch(logits=logits, y=y, c=logits.softmax(1))).item() == pytest.approx(0, abs=1e-6)


FEATURES = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]])
LABELS = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("name", ["cos", "ortho"])
def test_diversity_terms_within_class_and_over_all_pairs(name):
    b = batch(features=FEATURES, y=LABELS)
    # same-class pairs are parallel (cos 1), cross-class pairs orthogonal (cos 0)
    assert term(name, diversity_scope="class")(b).item() == pytest.approx(1.0)
    assert term(name, diversity_scope="all")(b).item() == pytest.approx(4 / 12)


def test_ortho_squares_cosines():
    feats = torch.tensor([[1.0, 0], [1.0, 1.0]])  # cos = 1/sqrt(2)
    b = batch(features=feats, y=torch.tensor([0, 0]), x=torch.zeros(2, 1, 28, 28))
    assert term("cos")(b).item() == pytest.approx(2 ** -0.5)
    assert term("ortho")(b).item() == pytest.approx(0.5)


def test_mode_seeking_is_inverse_pixel_over_latent_distance():
    x = torch.stack([torch.zeros(1, 28, 28), torch.ones(1, 28, 28), torch.full((1, 28, 28), 5.0)])
    z = torch.stack([torch.zeros(100), torch.full((100,), 2.0), torch.zeros(100)])
    # only the first two share a label: |dx| = 1, |dz| = 2 -> 1 / 0.5
    b = batch(x=x, z=z, y=torch.tensor([0, 0, 1]))
    assert term("ms")(b).item() == pytest.approx(2.0, rel=1e-4)


def test_tv_of_vertical_stripes():
    x = torch.ones(2, 1, 28, 28)
    x[..., ::2] = -1  # columns alternate -1, 1: horizontal differences are ±2, vertical 0
    assert term("tv")(batch(x=x)).item() == pytest.approx(4.0)
    assert term("tv")(batch(x=torch.zeros(2, 1, 28, 28))).item() == 0


def test_pixel_penalises_only_beyond_the_bound():
    pre = torch.full((2, 1, 28, 28), 3.0)
    assert term("pixel")(batch(x=pre.tanh(), pre_tanh=pre)).item() == pytest.approx(4.0)
    assert term("pixel")(batch(x=pre.tanh(), pre_tanh=-pre)).item() == pytest.approx(4.0)
    assert term("pixel")(batch(x=pre.tanh(), pre_tanh=pre / 4)).item() == 0


def test_pert_with_an_input_independent_classifier():
    # W = 0: f(x') = f(x) = uniform, so pert = CE + KL(c||p) + KL(p||p) = 2 log K under hot c
    assert term("pert")(batch()).item() == pytest.approx(2 * math.log(K), abs=1e-5)


def test_conf_prob_and_entropy():
    assert term("conf")(batch()).item() == pytest.approx(1 - 1 / K)
    assert term("conf", conf_form="entropy")(batch()).item() == pytest.approx(math.log(K))
    confident = torch.full((4, K), -50.0)
    confident[:, 0] = 50
    assert term("conf")(batch(logits=confident)).item() == pytest.approx(0, abs=1e-6)


def test_grad_norm_of_a_zero_linear_classifier():
    # dCE/dW = (p - e_y) x^T and dCE/db = p - e_y for one sample; p uniform since W = 0
    x = torch.rand(1, 1, 28, 28)
    b = batch(x=x, y=torch.tensor([3]))
    residual = torch.full((K,), 1 / K)
    residual[3] -= 1
    expected = residual.norm() * math.sqrt(x.pow(2).sum().item() + 1)
    assert term("grad")(b).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kkt_with_vanishing_lambda_is_one_and_trains_generator_and_lambda():
    classifier = LinearClassifier()
    nn.init.normal_(classifier.fc.weight)
    t = term("kkt", classifier=classifier, kkt_lambda_init=1e-12, kkt_lambda_min=0.0, kkt_layers=1)
    assert t.num_codes == 1000  # 10 codes per class per 100 training images, N = 1000
    value = t(batch())
    assert value.item() == pytest.approx(1.0, abs=1e-6)  # ||θ - 0||² / ||θ||²
    t2 = term("kkt", classifier=classifier, kkt_lambda_init=0.01)
    value = t2(batch())
    value.backward()
    assert t2.a.grad is not None and t2.a.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t2.inverter[0].parameters())


def test_kkt_lambda_penalty():
    t = term("kkt", kkt_lambda_init=1e-12, kkt_lambda_min=0.5, kkt_lambda_weight=2.0)
    nn.init.normal_(t.f.fc.weight)
    assert t(batch()).item() == pytest.approx(1.0 + 2.0 * 0.25, abs=1e-5)


def test_bn_matches_features_entering_batchnorm():
    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.bn.eval()

        def forward(self, x):
            f = self.bn(x.flatten(1)[:, :4])
            return f.repeat(1, 3)[:, :K], f

    net = BNNet()
    t = term("bn", classifier=net)
    x = torch.zeros(2, 1, 28, 28)
    x.view(2, -1)[0, :4], x.view(2, -1)[1, :4] = 1.0, 3.0  # mean 2, biased var 1 per feature
    with t.capture():
        logits, feats = net(x)
    assert t(batch(x=x, logits=logits, features=feats, y=torch.zeros(2, dtype=torch.long))).item() == pytest.approx(16.0)
    # DeepInversion's form: ‖(2, 2, 2, 2)‖₂ + ‖0‖₂ = 4
    t = term("bn", classifier=net, bn_form="norm")
    with t.capture():
        logits, feats = net(x)
    assert t(batch(x=x, logits=logits, features=feats, y=torch.zeros(2, dtype=torch.long))).item() == pytest.approx(4.0)


def test_zero_weight_terms_are_not_built():
    cfg = LossConfig(ce=1, kl=0, kkt=0, bn=0.5, tv=0.1)
    terms = build_loss_terms(cfg, LinearClassifier(), generator_inverter(), 1000, 8, 0)
    assert list(terms) == ["ce", "tv"]  # bn asked for, but this classifier has no BatchNorm


class SquareSumClassifier(nn.Module):
    """logits = (a · Σ x², 0, ..., 0): the same for every sign pattern of a perturbation of x = 0."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x):
        s = self.a * x.pow(2).flatten(1).sum(1)
        logits = torch.cat([s[:, None], torch.zeros(len(x), K - 1)], 1)
        return logits, logits


def test_pert_scores_the_perturbed_image_not_the_clean_one():
    # x = 0, so f(x) is uniform; x' = ±ε per pixel gives logit s = a · 784 ε² for class 0 whatever
    # the signs: pert = CE(p', 0) + KL(c || p') + KL(u || p') with Z = e^s + 9:
    # 2 (log Z − s) + (log Z − log 10 − s / 10). Without the noise it would be 2 log 10.
    eps, s = 0.1, 2.0
    t = term("pert", classifier=SquareSumClassifier(s / (784 * eps ** 2)), pert_epsilon=eps)
    z = math.exp(s) + 9
    expected = 2 * (math.log(z) - s) + math.log(z) - math.log(K) - s / K
    value = t(batch(logits=torch.zeros(4, K))).item()
    assert value == pytest.approx(expected, abs=1e-5)
    assert abs(value - 2 * math.log(K)) > 0.5


def test_bn_counts_the_variance_half():
    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.bn.eval()  # running mean 0, running variance 1

        def forward(self, x):
            f = self.bn(x.flatten(1)[:, :4])
            return f.repeat(1, 3)[:, :K], f

    net = BNNet()
    x = torch.zeros(2, 1, 28, 28)
    x.view(2, -1)[0, :4], x.view(2, -1)[1, :4] = 1.0, 5.0  # mean 3, biased variance 4 per feature
    for form, expected in (("squared", 4 * 3 ** 2 + 4 * 3 ** 2), ("norm", 6.0 + 6.0)):  # ‖(3,3,3,3)‖ = 6
        t = term("bn", classifier=net, bn_form=form)
        with t.capture():
            logits, feats = net(x)
        assert t(batch(x=x, logits=logits, features=feats, y=torch.zeros(2, dtype=torch.long))).item() == \
            pytest.approx(expected)
