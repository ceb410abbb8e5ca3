"""Benchmark: the direct-KKT reconstruction step, as the harness takes it now against the way it
took it before, measured in the same run on the same candidates.

  before: every layer's gradient G = Σ_i λ_i ∇_θ m_i formed by autograd (`kkt_residual_explicit`),
          and the backward pass computing gradients for every leaf, the classifier's θ copies too;
  now:    Linear layers by the Gram form (`kkt_residual`: no out x in gradient, no gradient with
          respect to W), and the backward pass restricted to what the optimiser steps (the
          candidates and the multipliers), as `Trial.train_epoch` does.

One step = residual, backward, Adam on the candidates and multipliers. The positive control's
classifier (bias-free 784-1000-1000-10 MLP, softplus-smoothed ReLU) at n = 20, 100, 200, 500
(bank 2n), and the CNN positive control's 1-block average-pooling CNN at n = 20. The two ways
alternate in segments; the residuals and gradients are compared in the run (relative gap), and
the new step's FLOP/s is set against the matmul rate measured in the same run.

    python benchmarks/kkt_step.py [--steps 10] [--sizes 20,100,200,500] [--threads 1]
"""
from __future__ import annotations

import statistics
import time

from common import matmul_flops, parser, report, sync

MLP = ["classifier.arch=mlp", "classifier.widths=[1000,1000]", "classifier.norm=none", "classifier.bias=false",
       "classifier.activation=relu", "classifier.dropout=0", "classifier.center=true"]
CNN = ["classifier.arch=cnn", "classifier.depth=1", "classifier.pool=avg", "classifier.norm=none",
       "classifier.bias=false", "classifier.activation=relu", "classifier.dropout=0", "classifier.center=true"]


def setup(settings: list[str], n: int, device, tiny: bool):
    import torch

    from harness.science.classifiers import build_classifier
    from harness.config import build_config

    if tiny:
        settings = [s if not s.startswith("classifier.widths") else "classifier.widths=[64,64]" for s in settings]
    cfg = build_config(None, settings)
    torch.manual_seed(0)
    model = build_classifier(cfg.classifier).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = (0.05 * torch.randn(2 * n, 1, 28, 28, device=device)).requires_grad_(True)
    y = torch.arange(2 * n, device=device) % 10
    a = torch.full((2 * n, 10), 0.1, device=device, requires_grad=True)
    return model, x, y, a, sum(p.numel() for p in model.parameters())


def step_fn(model, x, y, a, old: bool):
    import torch

    from harness.science.classifiers import smoothed_relu
    from harness.science.kkt import kkt_residual, kkt_residual_explicit, theta_params

    fn = kkt_residual_explicit if old else kkt_residual
    opt = torch.optim.Adam([x, a], lr=1e-3)

    def step():
        with smoothed_relu(model, 56.5):
            r = fn(model, theta_params(model, 0), x, y, a.pow(2))
        opt.zero_grad(set_to_none=True)
        r.backward(inputs=None if old else [x, a])
        opt.step()
        return r
    return step


def compare(model, x, y, a) -> float:
    """The largest relative gap between the two ways: residual, gradient in x, gradient in λ."""
    import torch

    from harness.science.classifiers import smoothed_relu
    from harness.science.kkt import kkt_residual, kkt_residual_explicit, theta_params

    out = []
    with smoothed_relu(model, 56.5):
        for fn in (kkt_residual_explicit, kkt_residual):
            r = fn(model, theta_params(model, 0), x, y, a.pow(2))
            out.append((r.detach(), *torch.autograd.grad(r, [x, a])))
    return max(((u - v).norm() / u.norm()).item() for u, v in zip(*out))


def time_both(model, x, y, a, steps: int, segments: int, device) -> dict[str, float]:
    x0, a0 = x.detach().clone(), a.detach().clone()
    times = {"before": [], "now": []}
    for _ in range(segments):
        for arm in ("before", "now"):
            with_grad = [x, a]
            for t, t0 in zip(with_grad, (x0, a0)):
                t.data.copy_(t0)
            step = step_fn(model, x, y, a, arm == "before")
            step()  # warm-up
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times[arm].append((time.perf_counter() - start) / steps)
    return {arm: statistics.median(v) for arm, v in times.items()}


def new_step_flops(model, x, y, a) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    step = step_fn(model, x, y, a, old=False)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps per timed segment")
    p.add_argument("--segments", type=int, default=3, help="alternating segments per arm")
    p.add_argument("--sizes", default="20,100,200,500", help="training-set sizes n of the MLP (bank 2n)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from harness.trial import resolve_device

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = resolve_device(args.device)
    sizes = [10] if args.tiny else [int(s) for s in args.sizes.split(",")]
    steps, segments = (2, 1) if args.tiny else (args.steps, args.segments)
    mm = matmul_flops(device, seconds=0.5 if args.tiny else 2.0)
    cases = [(f"MLP n={n}", MLP, n) for n in sizes] + [("CNN 1-block n=20", CNN, 10 if args.tiny else 20)]
    rows, figures = [], {"threads": args.threads, "steps": steps, "segments": segments, "cases": {}}
    for label, settings, n in cases:
        model, x, y, a, params = setup(settings, n, device, args.tiny)
        gap = compare(model, x, y, a)
        t = time_both(model, x, y, a, steps, segments, device)
        flops = new_step_flops(model, x, y, a)
        share = flops / t["now"] / mm
        figures["cases"][label] = {"n": n, "candidates": 2 * n, "parameters": params, "ms_before": t["before"] * 1e3,
                                   "ms_now": t["now"] * 1e3, "speedup": t["before"] / t["now"],
                                   "ms_per_candidate_now": t["now"] * 1e3 / (2 * n), "relative_gap": gap,
                                   "step_gflop_now": flops / 1e9, "matmul_share_now": share}
        rows.append([label, 2 * n, t["before"] * 1e3, t["now"] * 1e3, t["before"] / t["now"], share, gap])
    figures["matmul_gflops"] = mm / 1e9
    report(f"Direct-KKT step, before and now ({device}, {args.threads} thread(s), median of {segments} alternating "
           f"segments of {steps} steps)",
           ["classifier", "candidates", "ms before", "ms now", "speedup", "now: share of matmul rate",
            "largest relative gap"], rows,
           [f"Matmul rate measured in this run: {mm / 1e9:.1f} GFLOP/s (fp32, 1024 x 1024)."], figures, args.json)


if __name__ == "__main__":
    main()
