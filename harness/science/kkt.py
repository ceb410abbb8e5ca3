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
    benchmarks/kkt_step.py times it.

    A model that is a chain of known layers (the CNNs and MLPs here) takes `kkt_residual_chain`, the
    same value with the backward pass written out by hand."""
    chain = kkt_residual_chain(model, theta, x, y, lam, scale)
    if chain is not None:
        return chain
    return kkt_residual_hooked(model, theta, x, y, lam, scale)


def kkt_residual_hooked(model: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        lam: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`kkt_residual` for any model: the Gram form on Linear layers found by forward hooks, every
    other gradient formed by autograd's double backward."""
    given = theta
    hooked = _hooked_forward(model, theta, x)
    if hooked is None:  # a shared layer: its gradient is a sum over its calls, which the Gram form does not cover
        return kkt_residual_explicit(model, given, x, y, lam, scale)
    logits, theta, seen, by_gram = hooked
    weighted = _weighted_margins(logits, y, lam, scale)
    names = list(seen)
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


def _hooked_forward(model: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor):
    """The forward pass the Gram form reads: (logits, θ with the Gram layers' entries detached, {layer
    name: (its input H, its output Z)} of each Linear layer of θ taken by the Gram form, the θ keys
    it covers), or None where such a layer is called more than once. A Linear layer is taken by the
    Gram form where that is the cheaper: B (in + out) < in · out for B rows."""
    rows = x.shape[0]
    linear = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and f"{name}.weight" in theta
              and rows * (mod.in_features + mod.out_features) < mod.in_features * mod.out_features}
    by_gram = {f"{name}.{p}" for name in linear for p in ("weight", "bias")}
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
    if reused:
        return None
    return logits, theta, {name: seen[name] for name in linear}, by_gram


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
    given = theta
    hooked = _hooked_forward(model, theta, x)
    if hooked is None:  # a shared layer: its gradient is a sum over its calls, which the Gram form does not cover
        return kkt_residual_split_explicit(model, given, x, y, lam, scale, split)
    logits, theta, seen, by_gram = hooked
    names = list(seen)
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



# --- the residual by a hand-written backward pass (first-order autograd only) -----------------------

def _chain_ops(model: nn.Module) -> list[nn.Module] | None:
    """`model` as the flat list of layers its forward pass applies in turn, where it is such a chain
    of the layers `_chain_forward` knows (the CNNs and MLPs here, centred or not); None otherwise."""
    # the classifiers' classes by their parts (this module must not import harness.science.classifiers,
    # which imports it): Centered (model, input_mean), ShallowCNN (features, fc, head), MLP (body, head)
    if _is_centered(model):
        inner = _chain_ops(model.model)
        return None if inner is None else [model, *inner]
    if type(model).__name__ == "ShallowCNN":
        parts = [*model.features, *model.fc, model.head]
    elif type(model).__name__ == "MLP":
        parts = [*model.body, model.head]
    else:
        return None
    known = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d)
    for m in parts:
        if not (isinstance(m, known) or _is_activation(m)) or (isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.training):
            return None
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.stride != (1, 1) or m.dilation != (1, 1)
                                         or not isinstance(m.padding, tuple) or m.padding_mode != "zeros"):
            return None
        if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) and not _plain_pool(m):
            return None
    return parts


def _is_centered(m: nn.Module) -> bool:
    return type(m).__name__ == "Centered" and hasattr(m, "input_mean")


def _is_activation(m: nn.Module) -> bool:
    return type(m).__name__ == "Activation" and hasattr(m, "slope") and hasattr(m, "alpha")


def _plain_pool(m: nn.Module) -> bool:
    k, s = m.kernel_size, m.stride
    if isinstance(m, nn.AvgPool2d):
        return k == 2 and s == 2 and m.padding == 0 and not m.ceil_mode and m.divisor_override is None
    return k == 2 and s == 2 and m.padding == 0 and m.dilation == 1 and not m.ceil_mode


def kkt_residual_chain(model: nn.Module, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       lam: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
    """`kkt_residual` for a model that is a chain of known layers (`_chain_ops`), with the gradient
    Σ_i λ_i ∇_θ m_i formed by a backward pass written out by hand: autograd then differentiates a
    first-order expression once, instead of differentiating its own backward pass (the double
    backward through softplus, pooling and the convolution that dominated the CNN's step), and the
    expression can be compiled. Convolutions run as matrix products on unfolded patches, which the
    layer's gradient reuses; Linear layers take the Gram form where it is the cheaper, as in
    `kkt_residual`. None where the model is not such a chain (the caller falls back)."""
    ops = _chain_ops(model)
    if ops is None:
        return None
    prefix = {id(m): name for name, m in model.named_modules()}
    rows = x.shape[0]

    chosen = {id(m) for m in ops if any(f"{prefix[id(m)]}.{p}".lstrip(".") in theta for p in ("weight", "bias"))}
    gram = {id(m) for m in ops if isinstance(m, nn.Linear) and id(m) in chosen
            and rows * (m.in_features + m.out_features) < m.in_features * m.out_features}

    def param(m, p):  # θ's copy where θ holds it; no gradient with respect to a layer by the Gram form
        value = theta.get(f"{prefix[id(m)]}.{p}".lstrip("."), getattr(m, p))
        return value.detach() if id(m) in gram else value

    first = next((i for i, m in enumerate(ops) if id(m) in chosen), len(ops))
    kept, h = [], x
    for m in ops:  # forward, keeping what each layer's backward needs
        if _is_centered(m):
            kept.append(None)
            h = h - m.input_mean
        elif isinstance(m, nn.Conv2d):
            w, b = param(m, "weight"), (param(m, "bias") if m.bias is not None else None)
            if m.in_channels == 1:  # a matrix product on the unfolded patches, which the gradient reuses
                patches = F.unfold(h, m.kernel_size, padding=m.padding)  # (B, k·k, L)
                kept.append((h.shape, patches))
                size = (h.shape[2] + 2 * m.padding[0] - w.shape[2] + 1, h.shape[3] + 2 * m.padding[1] - w.shape[3] + 1)
                h = (w.flatten(1) @ patches).reshape(h.shape[0], w.shape[0], *size)
                if b is not None:
                    h = h + b[:, None, None]
            else:
                kept.append((h.shape, h))
                h = F.conv2d(h, w, b, padding=m.padding)
        elif isinstance(m, nn.Linear):
            z = F.linear(h, param(m, "weight"), param(m, "bias") if m.bias is not None else None)
            kept.append((h, z))
            h = z
        elif _is_activation(m):
            h, slope = _activation(m, h)
            kept.append(slope)
        elif isinstance(m, nn.AvgPool2d):
            kept.append(h.detach())
            h = F.avg_pool2d(h, 2)
        elif isinstance(m, nn.MaxPool2d):
            size = h.shape[-2:]
            h, idx = F.max_pool2d(h, 2, return_indices=True)
            kept.append((size, idx))
        elif isinstance(m, nn.Flatten):
            kept.append(h.shape)
            h = h.flatten(1)
        else:
            kept.append(None)
    d = _margin_weights(h, y, lam, scale)
    residual = 0.0
    with torch.no_grad():  # θ is fixed: each layer's ‖W‖², once a call, for the norm and the Gram form
        squares = {name: p.detach().float().pow(2).sum() for name, p in theta.items()}
    norm = sum(squares.values())
    for i in range(len(ops) - 1, first - 1, -1):  # backward, by hand
        m, k = ops[i], kept[i]
        if isinstance(m, nn.Conv2d):
            w = param(m, "weight")
            d3 = d.flatten(2)  # (B, out, L)
            if id(m) in chosen:
                if m.in_channels == 1:
                    g = torch.bmm(d3, k[1].transpose(1, 2)).sum(0).reshape(w.shape)
                else:
                    g = torch.nn.grad.conv2d_weight(k[1], w.shape, d, padding=m.padding)
                residual = residual + (w - g).pow(2).sum()
                if m.bias is not None:
                    residual = residual + (param(m, "bias") - d3.sum((0, 2))).pow(2).sum()
            if i > first:
                d = F.conv_transpose2d(d, w, padding=m.padding)
        elif isinstance(m, nn.Linear):
            w, (h, z) = param(m, "weight"), k
            b = param(m, "bias") if m.bias is not None else None
            if id(m) in chosen:
                if id(m) in gram:
                    hf, zf, df = h.float(), z.float(), d.float()
                    with torch.autocast(x.device.type, enabled=False):  # float32: the terms cancel near 0
                        zb = zf - b.float() if b is not None else zf
                        residual = residual + squares[f"{prefix[id(m)]}.weight".lstrip(".")] - 2 * (df * zb).sum() \
                            + ((df @ df.T) * (hf @ hf.T)).sum()
                else:
                    residual = residual + (w - d.T @ h).pow(2).sum()
                if b is not None:
                    residual = residual + (b - d.sum(0)).pow(2).sum()
            if i > first:
                d = d @ w
        elif _is_activation(m):
            d = d * k
        elif isinstance(m, nn.AvgPool2d):
            d = _avg_pool2_back(d, k)
        elif isinstance(m, nn.MaxPool2d):
            d = F.max_unpool2d(d, k[1], 2, output_size=k[0])
        elif isinstance(m, nn.Flatten):
            d = d.reshape(k)
    return residual / norm


def _margin_weights(logits: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient of `_weighted_margins` with respect to the logits, in closed form."""
    own = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    if lam.dim() == 2:
        w = lam * (1 - own) * scale
        return own * w.sum(1, keepdim=True) - w
    other = logits.detach().masked_fill(own.bool(), float("-inf")).argmax(1)
    return (lam * scale)[:, None] * (own - F.one_hot(other, logits.shape[1]).to(logits.dtype))


def _avg_pool2_back(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gradient of nn.AvgPool2d(2) at its input `h`, given the gradient `d` at its output (its own
    derivative in `d` is the pooling again, cheaper than the sum over an expanded view)."""
    return torch.ops.aten.avg_pool2d_backward(d, h, [2, 2], [2, 2], [0, 0], False, True, None)


def _activation(m: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Activation` m at z, and its derivative there (of its smoothed form where m.alpha > 0)."""
    if m.alpha > 0:
        s = torch.sigmoid(m.alpha * z)
        out = F.softplus(z, beta=m.alpha, threshold=20.0)
        if m.slope:
            return m.slope * z + (1 - m.slope) * out, m.slope + (1 - m.slope) * s
        return out, s
    return m(z), torch.where(z > 0, 1.0, m.slope).to(z.dtype)
