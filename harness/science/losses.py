"""Loss terms of the inversion objective (method.md section 4), one class each, in a registry.

`build_loss_terms` builds a term only when its weight is > 0: a term at weight 0 does not exist,
costs nothing and is not logged. A term sees the step's `GeneratedBatch` and returns a scalar.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from harness.config import LossConfig
from harness.science.data import NUM_CLASSES
from harness.science.kkt import kkt_residual, kkt_residual_split, multiplier_shape, theta_params


@dataclass
class GeneratedBatch:
    x: torch.Tensor         # B x 1 x 28 x 28 generated images in [-1, 1]
    pre_tanh: torch.Tensor  # the generator's output before Tanh
    c: torch.Tensor         # B x K conditioning vectors
    y: torch.Tensor         # B target labels (argmax c)
    logits: torch.Tensor    # f(x)
    features: torch.Tensor  # penultimate features of f(x), B x D
    z: torch.Tensor | None = None  # the latents that made x


def kl_div(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q), batch mean, with 0 log 0 = 0 (so one-hot p is fine)."""
    return (torch.xlogy(p, p) - p * log_q).sum(1).mean()


def pair_mask(y: torch.Tensor, scope: str) -> torch.Tensor:
    """Off-diagonal pairs, restricted to same-label pairs when scope == 'class'."""
    off_diag = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    return off_diag & (y[:, None] == y[None, :]) if scope == "class" else off_diag


class LossTerm(nn.Module):
    """A weighted term. Subclasses implement `forward(batch)`; `capture()` wraps the
    classifier's forward on the batch for terms that need to look inside it."""

    def __init__(self, cfg: LossConfig, classifier: nn.Module, inverter: nn.Module, train_size: int,
                 batch_size: int, seed: int):
        super().__init__()
        self.cfg = cfg
        self.classifier = [classifier]  # a list: not registered as a submodule (not trained)

    @property
    def f(self) -> nn.Module:
        return self.classifier[0]

    def capture(self):
        return contextlib.nullcontext()


class CrossEntropy(LossTerm):
    def forward(self, b: GeneratedBatch):
        return F.cross_entropy(b.logits, b.y)


class KLToConditioning(LossTerm):
    def forward(self, b: GeneratedBatch):
        return kl_div(b.c, F.log_softmax(b.logits, 1))


class CosineDiversity(LossTerm):
    def forward(self, b: GeneratedBatch):
        f = F.normalize(b.features, dim=1)
        mask = pair_mask(b.y, self.cfg.diversity_scope)
        if not mask.any():
            return b.features.new_zeros(())
        return (f @ f.T)[mask].mean()


class Orthogonality(LossTerm):
    def forward(self, b: GeneratedBatch):
        # ||F^F^T - I||_F^2 over the chosen pairs: the diagonal of F^F^T - I is 0 after
        # normalisation, so only the off-diagonal cosines remain; divided by the pair count.
        f = F.normalize(b.features, dim=1)
        mask = pair_mask(b.y, self.cfg.diversity_scope)
        if not mask.any():
            return b.features.new_zeros(())
        return (f @ f.T)[mask].pow(2).sum() / mask.sum()


class ModeSeeking(LossTerm):
    """Pixel-space diversity (Mao et al. 2019, mode-seeking GAN): for same-label pairs,
    1 / (mean |x_i − x_j| / mean |z_i − z_j| + ε). The feature-space terms (cos, ortho) can be
    satisfied by imperceptible pixel changes; this one needs images that differ."""

    def forward(self, b: GeneratedBatch):
        mask = pair_mask(b.y, "class")
        if not mask.any() or b.z is None:
            return b.x.new_zeros(())
        i, j = mask.nonzero(as_tuple=True)
        dx = (b.x[i] - b.x[j]).abs().flatten(1).mean(1)
        dz = (b.z[i] - b.z[j]).abs().mean(1)
        return 1.0 / ((dx / dz).mean() + 1e-5)


class TotalVariation(LossTerm):
    def forward(self, b: GeneratedBatch):
        dx = b.x[..., :, 1:] - b.x[..., :, :-1]
        dy = b.x[..., 1:, :] - b.x[..., :-1, :]
        return dx.pow(2).mean() + dy.pow(2).mean()


class PixelRange(LossTerm):
    def forward(self, b: GeneratedBatch):
        bound = self.cfg.pixel_bound
        v = b.pre_tanh
        return (F.relu(v - bound).pow(2) + F.relu(-bound - v).pow(2)).mean()


class PerturbationConsistency(LossTerm):
    def forward(self, b: GeneratedBatch):
        noisy = (b.x + self.cfg.pert_epsilon * torch.randn_like(b.x).sign()).clamp(-1, 1)
        log_p_noisy = F.log_softmax(self.f(noisy)[0], 1)
        p = F.softmax(b.logits, 1)
        return F.nll_loss(log_p_noisy, b.y) + kl_div(b.c, log_p_noisy) + kl_div(p, log_p_noisy)


class Confidence(LossTerm):
    def forward(self, b: GeneratedBatch):
        p = F.softmax(b.logits, 1)
        if self.cfg.conf_form == "entropy":
            return -torch.xlogy(p, p).sum(1).mean()
        return (1 - p.gather(1, b.y[:, None])).mean()


class GradientNorm(LossTerm):
    """||∇_θ CE(f(x), y)||_2, differentiated through to the generator (double backward)."""

    def forward(self, b: GeneratedBatch):
        theta = theta_params(self.f, self.cfg.grad_layers)
        logits, _ = functional_call(self.f, theta, (b.x,))
        grads = torch.autograd.grad(F.cross_entropy(logits, b.y), list(theta.values()), create_graph=True)
        return torch.sqrt(sum(g.pow(2).sum() for g in grads) + 1e-12)


class KKTStationarity(LossTerm):
    """‖θ − (M/B) Σ_i λ_i ∇_θ m_i(x_i)‖² / ‖θ‖² + w_λ · mean(relu(λ_min − λ)²) over the inverter's
    bank of M fixed candidates with learnable λ_i = a_i²: the whole bank every step for the direct
    inverter (an exact sum); for the generator's codes as `kkt_estimator` says: the whole bank (full),
    a minibatch of B codes (minibatch), or the unbiased product of two independent draws of B/2."""

    def __init__(self, cfg, classifier, inverter, train_size, batch_size, seed):
        super().__init__(cfg, classifier, inverter, train_size, batch_size, seed)
        self.inverter = [inverter]
        labels, whole = inverter.kkt_bank(seed)
        self.register_buffer("bank_y", labels)
        self.num_codes = len(labels)
        self.estimator = "full" if whole else cfg.kkt_estimator
        if self.estimator == "full":
            self.batch_size = self.num_codes
        elif self.estimator == "unbiased":  # two draws of half a batch each: B images a step, as minibatch
            self.batch_size = max(1, min(batch_size, self.num_codes) // 2)
        else:
            self.batch_size = min(batch_size, self.num_codes)
        self.layers = cfg.kkt_layers if cfg.kkt_layers is not None else inverter.kkt_layers_default
        self.a = nn.Parameter(torch.full(multiplier_shape(self.num_codes, NUM_CLASSES, cfg.kkt_margin),
                                         cfg.kkt_lambda_init ** 0.5))
        self._draw = torch.Generator().manual_seed(seed + 7919)

    def get_extra_state(self):  # the minibatch draw is part of a checkpoint (exact resume)
        return {"draw": self._draw.get_state()}

    def set_extra_state(self, state):
        self._draw.set_state(state["draw"])

    @property
    def lam(self) -> torch.Tensor:
        return self.a.pow(2)

    def draw(self) -> torch.Tensor:
        return torch.randperm(self.num_codes, generator=self._draw)[:self.batch_size].to(self.a.device)

    def forward(self, b: GeneratedBatch):
        split = None
        if self.estimator == "unbiased":  # two independent draws, rows [:split] and [split:]
            idx = torch.cat([self.draw(), self.draw()])
            split = self.batch_size
        elif self.batch_size == self.num_codes:
            idx = torch.arange(self.num_codes, device=self.a.device)
        else:
            idx = self.draw()
        x = self.inverter[0].kkt_images(idx)
        theta = theta_params(self.f, self.layers)
        scale = self.num_codes / self.batch_size
        if split is None:
            residual = kkt_residual(self.f, theta, x, self.bank_y[idx], self.lam[idx], scale)
        else:
            residual = kkt_residual_split(self.f, theta, x, self.bank_y[idx], self.lam[idx], scale, split)
        per_candidate = self.lam if self.lam.dim() == 1 else self.lam.sum(1) - self.lam.gather(
            1, self.bank_y[:, None]).squeeze(1)  # the own-class entry is not a multiplier
        penalty = F.relu(self.cfg.kkt_lambda_min - per_candidate).pow(2).mean()
        return residual + self.cfg.kkt_lambda_weight * penalty

    def bank_residual(self) -> float:
        """The normalised KKT residual over the whole bank at the current multipliers (the λ penalty
        left out), the candidates fixed: the `kkt_residual_bank` metric, the same quantity for both
        inverters (call it under the classifier's smoothing, as training does)."""
        idx = torch.arange(self.num_codes, device=self.a.device)
        with torch.no_grad():
            x = self.inverter[0].kkt_images(idx).detach().float()
        with torch.enable_grad():
            return kkt_residual(self.f, theta_params(self.f, self.layers), x, self.bank_y,
                                self.lam.detach()).item()


class BatchNormStatistics(LossTerm):
    """Σ over the classifier's BN layers of ‖μ_batch − μ_running‖² + ‖σ²_batch − σ²_running‖²
    (`bn_form: squared`), or of the norms themselves, ‖μ_batch − μ_running‖₂ + ‖σ²_batch −
    σ²_running‖₂ (`bn_form: norm`, DeepInversion's form), on the features entering each BN layer
    during the forward of the generated batch."""

    def __init__(self, cfg, classifier, inverter, train_size, batch_size, seed):
        super().__init__(cfg, classifier, inverter, train_size, batch_size, seed)
        self.layers = [m for m in classifier.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._inputs: list[torch.Tensor] = []

    @contextlib.contextmanager
    def capture(self):
        self._inputs = []
        hooks = [m.register_forward_pre_hook(lambda _m, args: self._inputs.append(args[0]))
                 for m in self.layers]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def forward(self, b: GeneratedBatch):
        total = b.x.new_zeros(())
        for layer, feats in zip(self.layers, self._inputs):
            dims = [0] + list(range(2, feats.dim()))
            mean = feats.mean(dims)
            var = feats.var(dims, unbiased=False)
            d_mean, d_var = mean - layer.running_mean, var - layer.running_var
            if self.cfg.bn_form == "norm":
                total = total + torch.linalg.vector_norm(d_mean) + torch.linalg.vector_norm(d_var)
            else:
                total = total + d_mean.pow(2).sum() + d_var.pow(2).sum()
        return total


LOSS_TERMS: dict[str, type[LossTerm]] = {
    "ce": CrossEntropy,
    "kl": KLToConditioning,
    "cos": CosineDiversity,
    "ortho": Orthogonality,
    "ms": ModeSeeking,
    "tv": TotalVariation,
    "pixel": PixelRange,
    "pert": PerturbationConsistency,
    "conf": Confidence,
    "grad": GradientNorm,
    "kkt": KKTStationarity,
    "bn": BatchNormStatistics,
}


def loss_weights(cfg: LossConfig) -> dict[str, float]:
    """The weight of every registered term, by name: the registry says which LossConfig fields
    are weights (the others are the terms' options)."""
    return {name: getattr(cfg, name) for name in LOSS_TERMS}


def build_loss_terms(cfg: LossConfig, classifier: nn.Module, inverter: nn.Module, train_size: int,
                     batch_size: int, seed: int) -> nn.ModuleDict:
    """The terms with weight > 0, in registry order. The BN prior needs BatchNorm layers."""
    terms = nn.ModuleDict()
    for name, weight in loss_weights(cfg).items():
        if weight > 0:
            term = LOSS_TERMS[name](cfg, classifier, inverter, train_size, batch_size, seed)
            if name == "bn" and not term.layers:
                continue  # a classifier without BatchNorm has no statistics to match
            terms[name] = term
    return terms
