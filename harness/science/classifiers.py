"""Classifiers that get inverted (registry: shallow CNN, MLP), the independent evaluator, and
their pretraining through the content-addressed cache.

Every model's forward returns (logits, penultimate features): the diversity losses act on the
features, the evaluator's features feed `fd_eval`.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from harness.cache import CacheEntry, cache_dir, code_fingerprint, module_sources
from harness.config import ClassifierConfig, ConfigError, EvaluatorConfig, TrialConfig
from harness.science.data import NUM_CLASSES, Split, centring_set, classifier_training_set, evaluator_set, full_test_set, heldout_set
from harness.science.kkt import fitted_residual, parameterised_layers

log = logging.getLogger(__name__)

# Bump when code that the fingerprints below do not name changes what a cached classifier or
# evaluator holds: it is part of every cache key, so old entries stop matching instead of being
# loaded into a new model.
MODEL_CODE_VERSION = 1

# The code that determines what a cached classifier holds (its weights, and the numbers stored beside
# them): the fingerprint of its text (`code_fingerprint`: docstrings, comments and layout left out)
# is part of every classifier cache key, so a change to any of it (fit_gd's update, a model's layers,
# the training subset) trains anew instead of loading what other code trained. A helper they call
# that is not named here is not covered: name it here. The KKT code counts only for classifiers
# whose stationarity is measured at pretraining (gd).
CLASSIFIER_CODE = {
    "harness.config": ("CENTRING_PER_CLASS",),
    "harness.science.classifiers": (
        "Activation", "_norm", "ShallowCNN", "MLP", "Centered", "CLASSIFIERS", "build_classifier", "warmup_lr",
        "fit_gd", "fit_classifier", "fit", "training_state", "predict", "accuracy", "centring_mean",
        "pretrained_classifier"),
    "harness.science.data": (
        "NUM_CLASSES", "read_idx", "_raw_files", "load_split", "to_unit_range", "balanced_indices", "Split",
        "train_subset", "classifier_training_set", "centring_set", "_TEST_SPLIT_SEED", "_test_halves", "full_test_set"),
}
STATIONARITY_CODE = {
    "harness.science.classifiers": ("stationarity",),
    "harness.science.data": ("heldout_set",),
    "harness.science.kkt": ("parameterised_layers", "theta_params", "margins", "_weighted_margins", "kkt_residual",
                            "kkt_residual_hooked", "_hooked_forward", "kkt_residual_chain", "_chain_ops", "_is_centered", "_is_activation", "_plain_pool",
                            "_margin_weights", "_avg_pool2_back", "_activation",
                            "kkt_residual_explicit", "multiplier_shape", "fitted_residual"),
}
EVALUATOR_CODE = {
    "harness.science.classifiers": ("EvaluatorCNN", "fit", "predict", "accuracy", "pretrained_evaluator"),
    "harness.science.data": ("NUM_CLASSES", "read_idx", "_raw_files", "load_split", "to_unit_range",
                             "balanced_indices", "Split", "_TEST_SPLIT_SEED", "_test_halves", "heldout_set",
                             "evaluator_set"),
}
# the text of those modules as this process imported them (a file edited later does not change the
# keys of the code that runs); kkt, data and config are imported above, this module is being imported
SOURCES = module_sources(["harness.config", "harness.science.classifiers", "harness.science.data",
                          "harness.science.kkt"])


def code_version(*parts: dict[str, tuple[str, ...]]) -> str:
    """The fingerprint of the code `parts` name together (`CLASSIFIER_CODE`, ...), in `SOURCES`."""
    merged: dict[str, set[str]] = {}
    for part in parts:
        for module, names in part.items():
            merged.setdefault(module, set()).update(names)
    return code_fingerprint({m: tuple(n) for m, n in merged.items()}, SOURCES)


class Activation(nn.Module):
    """ReLU or LeakyReLU(0.2) whose kink can be smoothed during inversion: with `alpha` > 0 the
    ReLU part becomes softplus(α·z)/α (Haim et al.'s smoothed ReLU, which gives the candidates'
    KKT gradients second derivatives). Parameter-free: smoothing never touches the weights."""

    def __init__(self, kind: str = "leaky_relu"):
        super().__init__()
        self.slope = {"leaky_relu": 0.2, "relu": 0.0}[kind]
        self.alpha = 0.0

    def forward(self, z):
        if self.alpha > 0:
            return self.slope * z + (1 - self.slope) * F.softplus(self.alpha * z) / self.alpha
        return F.leaky_relu(z, self.slope) if self.slope else F.relu(z)


@contextlib.contextmanager
def smoothed_relu(model: nn.Module, alpha: float):
    """Within the block, every `Activation` of `model` uses softplus(α·z)/α (α = 0: unchanged)."""
    acts = [m for m in model.modules() if isinstance(m, Activation)]
    before = [m.alpha for m in acts]
    for m in acts:
        m.alpha = alpha
    try:
        yield model
    finally:
        for m, a in zip(acts, before):
            m.alpha = a


def _norm(kind: str, channels: int, dims: int) -> list[nn.Module]:
    if kind == "none":
        return []
    return [nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)]


class ShallowCNN(nn.Module):
    """`depth` blocks of Conv3x3 -> BN -> LeakyReLU(0.2) -> Pool(2) -> Dropout2d, channels `widths`
    (default 32, 64, 128, ...), then FC -> 256 -> classes. `pool` is the only avg/max difference."""

    def __init__(self, depth: int = 2, pool: str = "avg", dropout: float = 0.2, num_classes: int = NUM_CLASSES,
                 norm: str = "batch", bias: bool = True, activation: str = "leaky_relu",
                 widths: list[int] | None = None):
        super().__init__()
        pool_layer = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool]
        blocks, channels, size = [], 1, 28
        for i in range(depth):
            out = widths[i] if widths else 32 * 2 ** i
            blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=bias), *_norm(norm, out, 2), Activation(activation),
                       pool_layer(2), nn.Dropout2d(dropout)]
            channels, size = out, size // 2
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 256, bias=bias), Activation(activation),
                                nn.Dropout(dropout))
        self.head = nn.Linear(256, num_classes, bias=bias)

    def forward(self, x):
        feats = self.fc(self.features(x))
        return self.head(feats), feats


class MLP(nn.Module):
    """flatten -> hidden layers of `widths` (default: `depth` layers of width, width/2, ...) each
    with BN (norm: batch), the activation and Dropout."""

    def __init__(self, depth: int = 2, width: int = 512, dropout: float = 0.2, num_classes: int = NUM_CLASSES,
                 widths: list[int] | None = None, norm: str = "batch", bias: bool = True,
                 activation: str = "leaky_relu"):
        super().__init__()
        widths = widths or [max(width // 2 ** i, 16) for i in range(depth)]
        layers, dim = [nn.Flatten()], 28 * 28
        for out in widths:
            layers += [nn.Linear(dim, out, bias=bias), *_norm(norm, out, 1), Activation(activation)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            dim = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dim, num_classes, bias=bias)

    def forward(self, x):
        feats = self.body(x)
        return self.head(feats), feats


class EvaluatorCNN(nn.Module):
    """The independent judge: 5x5 convs, max pooling, ReLU, no BatchNorm, a wide FC layer, so it
    shares no architecture with any inverted classifier."""

    num_features = 512

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, num_classes))

    def forward(self, x):
        feats = self.body(x)
        return self.head(feats), feats


class Centered(nn.Module):
    """`model` applied to x − mean: the per-pixel mean of the training images is a fixed part of the
    classifier (a buffer, saved with its weights), not a parameter θ."""

    def __init__(self, model: nn.Module, mean: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("input_mean", torch.zeros(1, 1, 28, 28) if mean is None else mean.reshape(1, 1, 28, 28))

    def forward(self, x):
        return self.model(x - self.input_mean)


CLASSIFIERS = {
    "cnn": lambda c: ShallowCNN(c.depth, c.pool, c.dropout, norm=c.norm, bias=c.bias, activation=c.activation,
                                widths=c.channels),
    "mlp": lambda c: MLP(c.depth, c.width, c.dropout, widths=c.widths, norm=c.norm, bias=c.bias,
                         activation=c.activation),
}


def build_classifier(cfg: ClassifierConfig, mean: torch.Tensor | None = None) -> nn.Module:
    """The classifier of `cfg`, freshly initialised (seed it first), first layer x init_scale; with
    `center`, wrapped to subtract `mean` (its training images' per-pixel mean) from its input."""
    model = CLASSIFIERS[cfg.arch](cfg)
    if cfg.init_scale != 1.0:
        with torch.no_grad():
            parameterised_layers(model)[0].weight.mul_(cfg.init_scale)
    return Centered(model, mean) if cfg.center else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """The learning rate of gd step `step` (0-based): lr · (step + 1) / warmup_steps during the
    warm-up, lr after it."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def fit_gd(model: nn.Module, data: Split, steps: int, lr: float, momentum: float, weight_decay: float,
           device: torch.device, warmup_steps: int = 0, fused: bool = True) -> nn.Module:
    """Full-batch gradient descent with momentum and L2 weight decay (learning rate warmed up
    linearly over `warmup_steps`): the regime in which a classifier approaches a stationary (KKT)
    point of its training loss. `fused`: torch's single-pass SGD update on a CPU or CUDA device,
    the same weights as the multi-pass one and, on a CPU, 1.2x faster a step for the positive
    control's MLP (benchmarks/pretrain.py)."""
    model.to(device).train()
    images, labels = data.images.to(device), data.labels.to(device)
    fused = fused and torch.device(device).type in ("cpu", "cuda")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, lr, warmup_steps)
        loss = F.cross_entropy(model(images)[0], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def fit_classifier(model: nn.Module, data: Split, c: ClassifierConfig, device) -> nn.Module:
    torch.manual_seed(c.seed)
    if c.optimizer == "gd":
        return fit_gd(model, data, c.steps, c.lr, c.momentum, c.weight_decay, device, c.warmup_steps)
    return fit(model, data, c.epochs, c.batch_size, c.lr, c.weight_decay, c.seed, device)


def training_state(model: nn.Module, data: Split, weight_decay: float, device) -> dict[str, float]:
    """Where training left the classifier: full-batch loss, accuracy and the norm of the gradient of
    loss + weight decay (0 at a stationary point), in eval mode."""
    model.eval()
    images, labels = data.images.to(device), data.labels.to(device)
    params = [p for p in model.parameters()]
    with torch.enable_grad():
        logits = model(images)[0]
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    total = sum(((g if g is not None else 0) + weight_decay * p.detach()).pow(2).sum() for g, p in zip(grads, params))
    return {"train_loss": loss.item(), "train_acc": (logits.argmax(1) == labels).float().mean().item(),
            "grad_norm": float(total) ** 0.5}


def fit(model: nn.Module, data: Split, epochs: int, batch_size: int, lr: float, weight_decay: float,
        seed: int, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Adam on preloaded tensors, batches by indexing (no DataLoader, no per-sample transforms).
    `channels_last` trains a CNN in that memory format and returns it in the default one. On a CPU
    that is about 1.4x faster, but torch's channels_last BatchNorm kernels for training are less
    precise: one step's gradients deviate from float64 by up to 2-9% of the largest entry instead of
    1e-4 (benchmarks/pretrain.py). So it is off by default."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device).to(memory_format=layout).train()
    images, labels = data.images.to(device).contiguous(memory_format=layout), data.labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen).to(device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            batch = images[idx].contiguous(memory_format=layout)
            loss = F.cross_entropy(model(batch)[0], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) in eval mode, batched."""
    was_training = model.training
    model.eval()
    logits, feats = zip(*(model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)))
    model.train(was_training)
    return torch.cat(logits), torch.cat(feats)


def accuracy(model: nn.Module, data: Split, device) -> float:
    logits, _ = predict(model, data.images.to(device))
    return (logits.argmax(1).cpu() == data.labels.cpu()).float().mean().item()


def classifier_spec(cfg: TrialConfig) -> dict:
    """Everything that determines the classifier's weights, and nothing else."""
    # a setting at its default before it existed is left out, so classifiers cached before it still match;
    # so is center_mean where it changes nothing (no centring)
    ignored = cfg.classifier.center_mean == "own" or not cfg.classifier.center
    classifier = cfg.classifier.model_dump(exclude={"center_mean"} if ignored else None)
    code = code_version(CLASSIFIER_CODE, *([STATIONARITY_CODE] if cfg.classifier.stationarity_budget else []))
    return {"model_code_version": MODEL_CODE_VERSION, "code": code, "data": cfg.data.model_dump(exclude={"root"}),
            "classifier": classifier}


def centring_mean(cfg: TrialConfig, train: Split) -> torch.Tensor:
    """The per-pixel mean a centred classifier subtracts (see `ClassifierConfig.center_mean`)."""
    if cfg.classifier.center_mean == "disjoint":
        return centring_set(cfg.data).images.mean(0)
    return train.images.mean(0)


def evaluator_spec(cfg: TrialConfig) -> dict:
    return {"model_code_version": MODEL_CODE_VERSION, "code": code_version(EVALUATOR_CODE),
            "dataset": cfg.data.dataset, "evaluator": cfg.evaluator.model_dump()}


def load_weights(model: nn.Module, state: dict, device) -> nn.Module:
    model.load_state_dict(state)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pretrained_classifier(cfg: TrialConfig, device) -> tuple[nn.Module, dict]:
    """The frozen classifier for `cfg`, trained once and then loaded from the cache.
    Returns (model, info): cache_key, cache_hit, seconds, and from training: test_acc, train_acc,
    train_loss, grad_norm, parameters, kkt_residual_train / _heldout (see `stationarity`)."""
    entry = CacheEntry(cache_dir(cfg.cache_dir), "classifier", classifier_spec(cfg))
    c = cfg.classifier

    def build():
        start = time.perf_counter()
        train = classifier_training_set(cfg.data)
        torch.manual_seed(c.seed)
        model = fit_classifier(build_classifier(c, centring_mean(cfg, train) if c.center else None), train, c,
                               device)
        meta = {"test_acc": accuracy(model, full_test_set(cfg.data), device),
                **training_state(model, train, c.weight_decay, device),
                "parameters": count_parameters(model), "train_seconds": time.perf_counter() - start}
        meta.update(stationarity(model, cfg, device))
        log.info("trained classifier %s: test acc %.4f", entry.key, meta["test_acc"])
        return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta}

    start = time.perf_counter()
    payload, hit = entry.get_or_build(build)
    meta = payload["meta"]
    if meta.get("train_acc", 1.0) <= 2.0 / NUM_CLASSES:  # chance is 1/K: nothing was learnt
        raise ClassifierDidNotTrain(
            f"classifier: pretraining left it at training accuracy {meta['train_acc']:.2f} (loss "
            f"{meta.get('train_loss', float('nan')):.4f}, chance level): every inversion of it would be "
            f"meaningless; lower classifier.lr (now {c.lr:g}) or raise classifier.init_scale (now {c.init_scale:g})")
    model = load_weights(build_classifier(c), payload["state_dict"], device)
    info = {"cache_key": entry.key, "cache_hit": hit, "seconds": time.perf_counter() - start, **meta}
    return model, info


class ClassifierDidNotTrain(ConfigError):
    """Pretraining ended at chance level (e.g. a bias-free ReLU network whose units all died): a
    configuration problem, reported like one (one line naming the settings to change, exit 2)."""


def stationarity(model: nn.Module, cfg: TrialConfig, device) -> dict[str, float]:
    """The KKT residual that the classifier's real training images reach when only their
    multipliers are fitted, beside the same for as many class-balanced held-out images: a
    classifier from which reconstruction can work shows a clearly lower value for its training
    images (Haim et al.'s condition holds for them, not for other images of the same classes)."""
    steps = cfg.classifier.stationarity_budget
    if not steps:
        return {}
    train = classifier_training_set(cfg.data)
    held = heldout_set(cfg.data, len(train) // NUM_CLASSES)
    per_class = min(len(train), len(held)) // NUM_CLASSES  # both sides the same size and balance
    train, held = train.head_per_class(per_class), held.head_per_class(per_class)
    return {name: fitted_residual(model, side.images.to(device), side.labels.to(device), steps)
            for name, side in (("kkt_residual_train", train), ("kkt_residual_heldout", held))}


def pretrained_evaluator(cfg: TrialConfig, device) -> tuple[nn.Module, dict]:
    """The independent evaluator of `cfg.data.dataset`: trained on the evaluator half of the test
    split (disjoint from every training subset), scored on the held-out half."""
    entry = CacheEntry(cache_dir(cfg.cache_dir), "evaluator", evaluator_spec(cfg))
    e: EvaluatorConfig = cfg.evaluator

    def build():
        model = fit(EvaluatorCNN(), evaluator_set(cfg.data), e.epochs, 100, 1e-3, 1e-5, e.seed, device)
        meta = {"heldout_acc": accuracy(model, heldout_set(cfg.data, 10_000), device)}
        log.info("trained evaluator %s: held-out acc %.4f", entry.key, meta["heldout_acc"])
        return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta}

    payload, hit = entry.get_or_build(build)
    model = load_weights(EvaluatorCNN(), payload["state_dict"], device)
    return model, {"cache_key": entry.key, "cache_hit": hit, **payload["meta"]}
