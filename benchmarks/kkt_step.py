"""Benchmark: the direct-KKT reconstruction step, the three ways the harness has taken it, measured
in the same run on the same candidates.

  explicit: every layer's gradient G = Σ_i λ_i ∇_θ m_i formed by autograd (`kkt_residual_explicit`),
            and the backward pass computing gradients for every leaf, the classifier's θ copies too;
  hooked:   Linear layers by the Gram form found by forward hooks, the rest by autograd's double
            backward (`kkt_residual_hooked`, the step before the hand-written backward pass), and
            the backward pass restricted to what the optimiser steps (the candidates and the
            multipliers), as `Trial.train_epoch` does;
  now:      `kkt_residual` as the harness takes it: for the CNNs and MLPs here the gradient formed by
            a backward pass written out by hand (`kkt_residual_chain`), differentiated once by autograd.

One step = residual, backward, Adam on the candidates and multipliers. The positive control's
classifier (bias-free 784-1000-1000-10 MLP, softplus-smoothed ReLU) at n = 20, 100, 200, 500
(bank 2n), and the CNN positive control's average-pooling CNN with 1 and 2 blocks at n = 10, 20, 50.
The ways alternate in segments; the residuals and gradients of `hooked` and `now` are compared with
`explicit` in the run (largest relative gap), and the new step's FLOP/s is set against the matmul
rate measured in the same run.

    python benchmarks/kkt_step.py [--steps 10] [--sizes 20,100,200,500] [--cnn-sizes 10,20,50] [--threads 1]
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


ARMS = ("explicit", "hooked", "now")


def residual_fn(arm: str):
    from harness.science import kkt

    return {"explicit": kkt.kkt_residual_explicit, "hooked": kkt.kkt_residual_hooked, "now": kkt.kkt_residual}[arm]


def step_fn(model, x, y, a, arm: str):
    import torch

    from harness.science.classifiers import smoothed_relu
    from harness.science.kkt import theta_params

    fn = residual_fn(arm)
    opt = torch.optim.Adam([x, a], lr=1e-3)

    def step():
        with smoothed_relu(model, 56.5):
            r = fn(model, theta_params(model, 0), x, y, a.pow(2))
        opt.zero_grad(set_to_none=True)
        r.backward(inputs=None if arm == "explicit" else [x, a])
        opt.step()
        return r
    return step


def compare(model, x, y, a) -> dict[str, float]:
    """The largest relative gap of `hooked` and of `now` from `explicit`: residual, gradient in x,
    gradient in λ."""
    import torch

    from harness.science.classifiers import smoothed_relu
    from harness.science.kkt import theta_params

    out = {}
    with smoothed_relu(model, 56.5):
        for arm in ARMS:
            r = residual_fn(arm)(model, theta_params(model, 0), x, y, a.pow(2))
            out[arm] = (r.detach(), *torch.autograd.grad(r, [x, a]))
    return {arm: max(((u - v).norm() / u.norm()).item() for u, v in zip(out["explicit"], out[arm]))
            for arm in ARMS[1:]}


def time_arms(model, x, y, a, steps: int, segments: int, device) -> dict[str, float]:
    x0, a0 = x.detach().clone(), a.detach().clone()
    times = {arm: [] for arm in ARMS}
    for _ in range(segments):
        for arm in ARMS:
            with_grad = [x, a]
            for t, t0 in zip(with_grad, (x0, a0)):
                t.data.copy_(t0)
            step = step_fn(model, x, y, a, arm)
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

    step = step_fn(model, x, y, a, "now")
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps per timed segment")
    p.add_argument("--segments", type=int, default=3, help="alternating segments per arm")
    p.add_argument("--sizes", default="20,100,200,500", help="training-set sizes n of the MLP (bank 2n)")
    p.add_argument("--cnn-sizes", default="10,20,50", help="training-set sizes n of the CNNs (bank 2n)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from harness.trial import resolve_device

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = resolve_device(args.device)
    sizes = [10] if args.tiny else [int(s) for s in args.sizes.split(",")]
    cnn_sizes = [5] if args.tiny else [int(s) for s in args.cnn_sizes.split(",")]
    steps, segments = (2, 1) if args.tiny else (args.steps, args.segments)
    mm = matmul_flops(device, seconds=0.5 if args.tiny else 2.0)
    cnn2 = [s if s != "classifier.depth=1" else "classifier.depth=2" for s in CNN]
    cases = [(f"MLP n={n}", MLP, n) for n in sizes] + [(f"CNN 1-block n={n}", CNN, n) for n in cnn_sizes] \
        + [(f"CNN 2-block n={n}", cnn2, n) for n in cnn_sizes]
    rows, figures = [], {"threads": args.threads, "steps": steps, "segments": segments, "cases": {}}
    for label, settings, n in cases:
        model, x, y, a, params = setup(settings, n, device, args.tiny)
        gaps = compare(model, x, y, a)
        t = time_arms(model, x, y, a, steps, segments, device)
        flops = new_step_flops(model, x, y, a)
        share = flops / t["now"] / mm
        figures["cases"][label] = {"n": n, "candidates": 2 * n, "parameters": params,
                                   **{f"ms_{arm}": t[arm] * 1e3 for arm in ARMS},
                                   "speedup_over_hooked": t["hooked"] / t["now"],
                                   "speedup_over_explicit": t["explicit"] / t["now"],
                                   "ms_per_candidate_now": t["now"] * 1e3 / (2 * n),
                                   "relative_gap_hooked": gaps["hooked"], "relative_gap_now": gaps["now"],
                                   "step_gflop_now": flops / 1e9, "matmul_share_now": share}
        rows.append([label, 2 * n, t["explicit"] * 1e3, t["hooked"] * 1e3, t["now"] * 1e3, t["hooked"] / t["now"],
                     share, gaps["now"]])
    figures["matmul_gflops"] = mm / 1e9
    report(f"Direct-KKT step, three ways ({device}, {args.threads} thread(s), median of {segments} alternating "
           f"segments of {steps} steps)",
           ["classifier", "candidates", "ms explicit", "ms hooked", "ms now", "now vs hooked",
            "now: share of matmul rate", "now: largest relative gap from explicit"], rows,
           [f"Matmul rate measured in this run: {mm / 1e9:.1f} GFLOP/s (fp32, 1024 x 1024)."], figures, args.json)


if __name__ == "__main__":
    main()
