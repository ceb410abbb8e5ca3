"""The KKT stationarity condition of a classifier trained to a max-margin point (Haim et al. 2022;
Buzaglo et al. 2023 for the multiclass margin), shared by the `kkt` loss term and the classifier's
stationarity diagnostic.

For a homogeneous network trained to convergence, θ ≈ Σ_i λ_i ∇_θ m_i(x_i) with λ_i ≥ 0 and the
multiclass margin m_i = Φ_{y_i}(x_i) − max_{j≠y_i} Φ_j(x_i) (`margin: max`). At a stationary point
of cross-entropy + weight decay the condition is exact with one multiplier per (image, other class)
pair: θ = Σ_i Σ_{j≠y_i} λ_ij ∇_θ (Φ_{y_i}(x_i) − Φ_j(x_i)), λ_ij = p_ij / (n · wd) ≥ 0 (`margin:
all`, Buzaglo et al.'s multiclass form). The residual of that equation, relative to ‖θ‖², is what
reconstruction drives to 0 over candidate images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def parameterised_layers(model: nn.Module) -> list[nn.Module]:
    """Conv and Linear layers in forward order (the θ that `grad` and `kkt` act on)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def theta_params(model: nn.Module, last_layers: int) -> dict[str, torch.Tensor]:
    """Detached, grad-requiring copies of the classifier parameters θ of its last `last_layers`
    Conv/Linear layers (0 = all), keyed for `torch.func.functional_call`."""
    layers = parameterised_layers(model)
    chosen = {id(m) for m in (layers[-last_layers:] if last_layers else layers)}
    theta = {}
    for mod_name, mod in model.named_modules():
        if id(mod) in chosen:
            for p_name, p in mod.named_parameters(recurse=False):
                theta[f"{mod_name}.{p_name}"] = p.detach().requires_grad_(True)
    return theta


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Own logit minus the largest other logit, per row."""
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(1).values
    return own - others


def _weighted_margins(logits: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, scale: float) -> torch.Tensor:
    if lam.dim() == 2:
        others = 1 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return (lam * others * (logits.gather(1, y[:, None]) - logits)).sum() * scale
    return (lam * margins(logits, y)).sum() * scale


def kkt_residual(model: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 lam: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """‖θ − scale · Σ_i λ_i ∇_θ m_i(x_i)‖² / ‖θ‖², differentiable in x and λ (θ from `theta_params`).
    λ of shape (n,) weighs the max-other-class margin; λ of shape (n, K) weighs every
    own-minus-other logit difference (the entry at the own class is ignored).

    A Linear layer's part is taken without forming its gradient G = Dᵀ H (D: the weighted sum's
    gradient at the layer's outputs Z, H: its inputs, one row per candidate): ‖W − G‖² =
    ‖W‖² − 2 Σ D∘(Z − b) + Σ (D Dᵀ)∘(H Hᵀ), with B x B Gram matrices in place of the out x in
    gradient, and no gradient with respect to W at all (so neither is there one in the backward
    pass), wherever that is the cheaper: B (in + out) < in · out, i.e. fewer candidates than about
    half the layer's width. Other layers (conv layers, a small head, a large bank) are formed as in
    `kkt_residual_explicit`, and so is the whole residual of a model that calls one Linear module
    more than once in its forward pass (its gradient sums over the calls). A model that uses a
    Linear layer's weight outside the module's own call (F.linear(h, layer.weight), a tied
    weight) is not detected and must use `kkt_residual_explicit`; no model here does. The same value to float rounding (tests/test_leakage.py);
    benchmarks/kkt_step.py times it."""
    rows = x.shape[0]
    linear = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and f"{name}.weight" in theta
              and rows * (mod.in_features + mod.out_features) < mod.in_features * mod.out_features}
    by_gram = {f"{name}.{p}" for name in linear for p in ("weight", "bias")}
    given = theta
    theta = {k: (p.detach() if k in by_gram else p) for k, p in theta.items()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reused: set[str] = set()

    def keep(name):
        def hook(module, inputs, output):
            if name in seen:
                reused.add(name)
            if not output.requires_grad:  # fixed candidates (the stationarity diagnostic): D is still needed
                output.requires_grad_(True)
            seen[name] = (inputs[0], output)
        return hook

    handles = [mod.register_forward_hook(keep(name)) for name, mod in linear.items()]
    try:
        logits, _ = functional_call(model, theta, (x,))
    finally:
        for handle in handles:
            handle.remove()
    if reused:  # a shared layer: its gradient is a sum over its calls, which the Gram form does not cover
        return kkt_residual_explicit(model, given, x, y, lam, scale)
    weighted = _weighted_margins(logits, y, lam, scale)
    names = list(linear)
    formed = [(k, p) for k, p in theta.items() if k not in by_gram]
    grads = torch.autograd.grad(weighted, [seen[n][1] for n in names] + [p for _, p in formed], create_graph=True)
    residual = sum((p - g).pow(2).sum() for (_, p), g in zip(formed, grads[len(names):]))
    for name, d in zip(names, grads[:len(names)]):
        h, z = seen[name]
        # in float32 even under autocast: the three terms cancel as the residual nears 0
        h, z, d = (t.reshape(-1, t.shape[-1]).float() for t in (h, z, d))
        w, b = theta[f"{name}.weight"].float(), theta.get(f"{name}.bias")
        with torch.autocast(x.device.type, enabled=False):
            residual = residual + w.pow(2).sum() - 2 * (d * (z - b.float() if b is not None else z)).sum() \
                + ((d @ d.T) * (h @ h.T)).sum()
        if b is not None:
            residual = residual + (b.float() - d.sum(0)).pow(2).sum()
    return residual / sum(p.pow(2).sum() for p in theta.values())


def kkt_residual_explicit(model: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                          lam: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`kkt_residual` by its definition: the gradient G = scale · Σ_i λ_i ∇_θ m_i(x_i) formed for every
    parameter by autograd, then ‖θ − G‖² / ‖θ‖² (the reference the Gram form is tested and timed against)."""
    logits, _ = functional_call(model, theta, (x,))
    weighted = _weighted_margins(logits, y, lam, scale)
    params = list(theta.values())
    grads = torch.autograd.grad(weighted, params, create_graph=True)
    residual = sum((p - g).pow(2).sum() for p, g in zip(params, grads))
    return residual / sum(p.pow(2).sum() for p in params)


def kkt_residual_split(model: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       lam: torch.Tensor, scale: float, split: int) -> torch.Tensor:
    """⟨θ − G_A, θ − G_B⟩ / ‖θ‖², G_A = scale · Σ_{i < split} λ_i ∇_θ m_i(x_i) over the rows before
    `split`, G_B the same over the rows from it (arguments as `kkt_residual`). For two independent
    minibatch draws of a bank, each scaled to an unbiased estimate of the bank's sum, this is an
    unbiased estimate of the bank's residual ‖θ − G‖² / ‖θ‖²: one draw's ‖θ − G_A‖² overestimates it
    by the draw's variance E‖G_A − G‖², which identical candidates lower. Rows must not interact in
    the forward pass (no BatchNorm in training mode), as in every classifier here in eval mode.

    Linear layers are taken by `kkt_residual`'s Gram form where it is the cheaper:
    ⟨W − D_Aᵀ H_A, W − D_Bᵀ H_B⟩ = ‖W‖² − Σ D_A∘(Z_A − b) − Σ D_B∘(Z_B − b) + Σ (D_A D_Bᵀ)∘(H_A H_Bᵀ);
    other parameters are formed by autograd (`kkt_residual_split_explicit` forms them all, the
    reference it is tested against)."""
    rows = x.shape[0]
    linear = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and f"{name}.weight" in theta
              and rows * (mod.in_features + mod.out_features) < mod.in_features * mod.out_features}
    by_gram = {f"{name}.{p}" for name in linear for p in ("weight", "bias")}
    given = theta
    theta = {k: (p.detach() if k in by_gram else p) for k, p in theta.items()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reused: set[str] = set()

    def keep(name):
        def hook(module, inputs, output):
            if name in seen:
                reused.add(name)
            if not output.requires_grad:
                output.requires_grad_(True)
            seen[name] = (inputs[0], output)
        return hook

    handles = [mod.register_forward_hook(keep(name)) for name, mod in linear.items()]
    try:
        logits, _ = functional_call(model, theta, (x,))
    finally:
        for handle in handles:
            handle.remove()
    if reused:  # a shared layer: its gradient is a sum over its calls, which the Gram form does not cover
        return kkt_residual_split_explicit(model, given, x, y, lam, scale, split)
    names = list(linear)
    formed = [p for k, p in theta.items() if k not in by_gram]
    halves = (slice(None, split), slice(split, None))
    targets = [seen[n][1] for n in names] + formed
    grads = [torch.autograd.grad(_weighted_margins(logits[h], y[h], lam[h], scale), targets, create_graph=True)
             for h in halves]
    residual = sum(((p - ga) * (p - gb)).sum() for p, ga, gb in
                   zip(formed, grads[0][len(names):], grads[1][len(names):]))
    for name, da, db in zip(names, grads[0][:len(names)], grads[1][:len(names)]):
        h, z = seen[name]
        cut = split * (h.reshape(-1, h.shape[-1]).shape[0] // rows)  # the layer's input rows of the first draw
        h, z, da, db = (t.reshape(-1, t.shape[-1]).float() for t in (h, z, da, db))
        w, b = theta[f"{name}.weight"].float(), theta.get(f"{name}.bias")
        with torch.autocast(x.device.type, enabled=False):  # float32: the terms cancel as the residual nears 0
            zb = z - b.float() if b is not None else z
            da, db = da[:cut], db[cut:]
            residual = residual + w.pow(2).sum() - (da * zb[:cut]).sum() - (db * zb[cut:]).sum() \
                + ((da @ db.T) * (h[:cut] @ h[cut:].T)).sum()
        if b is not None:
            residual = residual + ((b.float() - da.sum(0)) * (b.float() - db.sum(0))).sum()
    return residual / sum(p.pow(2).sum() for p in theta.values())


def kkt_residual_split_explicit(model: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor,
                                y: torch.Tensor, lam: torch.Tensor, scale: float, split: int) -> torch.Tensor:
    """`kkt_residual_split` by its definition: G_A and G_B formed for every parameter by autograd."""
    logits, _ = functional_call(model, theta, (x,))
    params = list(theta.values())
    ga, gb = (torch.autograd.grad(_weighted_margins(logits[h], y[h], lam[h], scale), params, create_graph=True)
              for h in (slice(None, split), slice(split, None)))
    return sum(((p - a) * (p - b)).sum() for p, a, b in zip(params, ga, gb)) / sum(p.pow(2).sum() for p in params)


def multiplier_shape(n: int, num_classes: int, margin: str) -> tuple[int, ...]:
    return (n, num_classes) if margin == "all" else (n,)


def fitted_residual(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.05,
                    margin: str = "all", num_classes: int = 10) -> float:
    """The smallest KKT residual that the images `x` reach when only their multipliers λ = a² are
    fitted (Adam, `steps` steps, all parameters, model in eval mode). Near 0 for the training images
    of a classifier at a KKT point, near 1 for images it has never seen."""
    was_training = model.training
    model.eval()
    theta = theta_params(model, 0)
    a = torch.full(multiplier_shape(len(y), num_classes, margin), 0.1, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    best = float("inf")
    with torch.enable_grad():
        for _ in range(steps):
            r = kkt_residual(model, theta, x, y, a.pow(2))
            best = min(best, r.item())
            opt.zero_grad(set_to_none=True)
            r.backward()
            opt.step()
    model.train(was_training)
    return best

