"""Classifiers that get inverted (registry: shallow CNN, MLP), the independent evaluator, and
their pretraining through the content-addressed cache.

Every model's forward returns (logits, penultimate features): the diversity losses act on the
features, the evaluator's features feed `fd_eval`.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from harness.cache import CacheEntry, cache_dir
from harness.config import ClassifierConfig, EvaluatorConfig, TrialConfig
from harness.data import NUM_CLASSES, Split, evaluator_set, full_test_set, heldout_set, train_subset

log = logging.getLogger(__name__)

# Bump when a model's code changes in a way that changes its trained weights: it is part of
# every cache key, so old entries stop matching instead of being loaded into a new model.
MODEL_CODE_VERSION = 1


class ShallowCNN(nn.Module):
    """`depth` blocks of Conv3x3 -> BN -> LeakyReLU(0.2) -> Pool(2) -> Dropout2d, channels
    32, 64, 128, ..., then FC -> 256 -> classes. `pool` is the only avg/max difference."""

    def __init__(self, depth: int = 2, pool: str = "avg", dropout: float = 0.2, num_classes: int = NUM_CLASSES):
        super().__init__()
        pool_layer = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool]
        blocks, channels, size = [], 1, 28
        for i in range(depth):
            out = 32 * 2 ** i
            blocks += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.LeakyReLU(0.2),
                       pool_layer(2), nn.Dropout2d(dropout)]
            channels, size = out, size // 2
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 256), nn.LeakyReLU(0.2),
                                nn.Dropout(dropout))
        self.head = nn.Linear(256, num_classes)

    def forward(self, x):
        feats = self.fc(self.features(x))
        return self.head(feats), feats


class MLP(nn.Module):
    """flatten -> `depth` hidden layers (width, width/2, ...) with BN, LeakyReLU(0.2), Dropout."""

    def __init__(self, depth: int = 2, width: int = 512, dropout: float = 0.2, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers, dim = [nn.Flatten()], 28 * 28
        for i in range(depth):
            out = max(width // 2 ** i, 16)
            layers += [nn.Linear(dim, out), nn.BatchNorm1d(out), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
            dim = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dim, num_classes)

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


CLASSIFIERS = {
    "cnn": lambda c: ShallowCNN(c.depth, c.pool, c.dropout),
    "mlp": lambda c: MLP(c.depth, c.width, c.dropout),
}


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    return CLASSIFIERS[cfg.arch](cfg)


def fit(model: nn.Module, data: Split, epochs: int, batch_size: int, lr: float, weight_decay: float,
        seed: int, device: torch.device) -> nn.Module:
    """Adam on preloaded tensors, batches by indexing (no DataLoader, no per-sample transforms)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    images, labels = data.images.to(device), data.labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen).to(device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            loss = F.cross_entropy(model(images[idx])[0], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


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
    return {"model_code_version": MODEL_CODE_VERSION, "data": cfg.data.model_dump(exclude={"root"}),
            "classifier": cfg.classifier.model_dump()}


def evaluator_spec(cfg: TrialConfig) -> dict:
    return {"model_code_version": MODEL_CODE_VERSION, "dataset": cfg.data.dataset,
            "evaluator": cfg.evaluator.model_dump()}


def load_weights(model: nn.Module, state: dict, device) -> nn.Module:
    model.load_state_dict(state)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pretrained_classifier(cfg: TrialConfig, device) -> tuple[nn.Module, dict]:
    """The frozen classifier for `cfg`, trained once and then loaded from the cache.
    Returns (model, info) with info = {cache_key, cache_hit, test_acc, train_acc, seconds}."""
    entry = CacheEntry(cache_dir(cfg.cache_dir), "classifier", classifier_spec(cfg))
    c = cfg.classifier

    def build():
        start = time.perf_counter()
        train, _ = train_subset(cfg.data)
        model = fit(build_classifier(c), train, c.epochs, c.batch_size, c.lr, c.weight_decay, c.seed, device)
        meta = {"test_acc": accuracy(model, full_test_set(cfg.data), device),
                "train_acc": accuracy(model, train, device), "train_seconds": time.perf_counter() - start}
        log.info("trained classifier %s: test acc %.4f", entry.key, meta["test_acc"])
        return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta}

    start = time.perf_counter()
    payload, hit = entry.get_or_build(build)
    model = load_weights(build_classifier(c), payload["state_dict"], device)
    info = {"cache_key": entry.key, "cache_hit": hit, "seconds": time.perf_counter() - start, **payload["meta"]}
    return model, info


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


def parameterised_layers(model: nn.Module) -> list[nn.Module]:
    """Conv and Linear layers in forward order (the θ that `grad` and `kkt` act on)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
