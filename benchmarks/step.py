"""Benchmark 2: the cost of one generator step per loss term, and of one direct-KKT step.

A CE-only step first (the baseline), then CE plus each other term at weight 1, each timed over the
same number of steps on the default trial (MNIST, N = 1000, 2-block avg-pool CNN, batch 64), so
the price of `kkt`, `grad` and `pert` is visible. Also the achieved FLOP/s of the CE-only step
(FLOPs counted by torch's FlopCounterMode) against the matmul rate measured in the same run.
Then the positive control's reconstruction step (search_spaces/trials/positive_control.yaml:
2n = 200 candidates, KKT over all 1.79 M parameters of the MLP): time per step and per
candidate, and its FLOP/s against the same matmul rate.

    python benchmarks/step.py [--steps 30] [--device cpu|cuda] [--set key=value ...]
"""
from __future__ import annotations

import time

from pathlib import Path

from common import matmul_flops, parser, report, sync

TERMS = ["kl", "cos", "ortho", "ms", "tv", "pixel", "pert", "conf", "grad", "kkt", "bn"]


def time_steps(trial, steps: int, device, warmup: int = 5) -> float:
    """Seconds per step, after `warmup` steps (allocator and kernel caches settle)."""
    trial.cfg.train.steps_per_epoch = warmup
    trial.train_epoch()
    trial.cfg.train.steps_per_epoch = steps
    sync(device)
    start = time.perf_counter()
    trial.train_epoch()
    sync(device)
    return (time.perf_counter() - start) / steps


def step_flops(trial) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        batch = trial.inverter.batch(trial.classifier, trial.terms, trial.rng)
        total = sum(trial.weights[n] * t(batch) for n, t in trial.terms.items())
        total.backward()
    trial.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def direct_kkt(args, device, steps: int, warmup: int, mm: float) -> tuple[list, dict]:
    from harness.config import build_config, load_yaml
    from harness.trial import Trial

    overrides = [f"device={device}"] + list(args.overrides)
    if args.tiny:
        overrides += ["classifier.steps=5", "classifier.widths=[64,64]", "evaluator.epochs=1",
                      "classifier.stationarity_steps=2", "eval.diversity_pairs=20", "eval.reference_per_class=10"]
    cfg = build_config(load_yaml(Path(__file__).resolve().parents[1] / "search_spaces" / "trials" /
                                 "positive_control.yaml"), overrides)
    trial = Trial(cfg)
    seconds = time_steps(trial, steps, device, warmup)
    flops = step_flops(trial)
    candidates = len(trial.inverter.labels)
    figures = {"ms_per_step": seconds * 1e3, "candidates": candidates, "ms_per_candidate": seconds * 1e3 / candidates,
               "step_gflop": flops / 1e9, "gflops": flops / seconds / 1e9, "matmul_share": flops / seconds / mm,
               "parameters": trial.classifier_info["parameters"]}
    row = [f"direct kkt + pixel, {candidates} candidates", seconds * 1e3, float("nan")]
    return row, figures


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--terms", default=",".join(TERMS), help="comma-separated terms to add to CE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-direct", action="store_true", help="skip the direct-KKT step")
    args = p.parse_args(argv)

    from harness.config import build_config
    from harness.trial import Trial, resolve_device

    device = resolve_device(args.device)
    base = {"device": str(device), "loss": {"ce": 1.0, "tv": 0.0, "bn": 0.0}}
    overrides = list(args.overrides)
    steps = args.steps
    if args.tiny:  # the classifier and evaluator of the tests' tiny trials (tests/conftest.py): cached once for all
        overrides += ["data.train_size=200", "classifier.epochs=2", "evaluator.epochs=1", "eval.per_class=10",
                      "eval.reference_per_class=10", "eval.diversity_pairs=20", "train.batch_size=16"]
        steps = 2
    warmup = 1 if args.tiny else 5
    terms = [t for t in args.terms.split(",") if t]
    rows, figures = [], {"steps": steps, "per_term": {}}
    baseline = None
    for term in ["ce", *terms]:
        cfg = build_config(base, overrides + ([f"loss.{term}=1"] if term != "ce" else []))
        trial = Trial(cfg)
        seconds = time_steps(trial, steps, device, warmup)
        if term == "ce":
            baseline = seconds
            flops = step_flops(trial)
        label = "ce only" if term == "ce" else f"ce + {term}"
        rows.append([label, seconds * 1e3, seconds / baseline])
        figures["per_term"][term] = {"ms_per_step": seconds * 1e3, "vs_ce": seconds / baseline}
    mm = matmul_flops(device, seconds=0.5 if args.tiny else 2.0)
    achieved = flops / baseline
    figures.update(ce_step_gflop=flops / 1e9, ce_gflops=achieved / 1e9, matmul_gflops=mm / 1e9,
                   matmul_share=achieved / mm, batch=cfg.train.batch_size)
    notes = [f"CE-only step: {flops / 1e9:.3f} GFLOP -> {achieved / 1e9:.1f} GFLOP/s achieved, "
             f"{100 * achieved / mm:.1f}% of the fp32 matmul rate measured in this run ({mm / 1e9:.0f} GFLOP/s)."]
    if not args.no_direct:
        row, direct = direct_kkt(args, device, steps, warmup, mm)
        rows.append(row)
        figures["direct_kkt"] = direct
        notes.append(f"Direct KKT step: {direct['candidates']} candidates, {direct['parameters'] / 1e6:.2f} M parameters: "
                     f"{direct['ms_per_step']:.0f} ms/step ({direct['ms_per_candidate']:.2f} ms per candidate), "
                     f"{direct['step_gflop']:.2f} GFLOP -> {direct['gflops']:.1f} GFLOP/s, "
                     f"{100 * direct['matmul_share']:.1f}% of the matmul rate.")
    report(f"Generator step cost per loss term (batch {cfg.train.batch_size}, {steps} steps each, {device})",
           ["loss terms", "ms / step", "x CE-only"], rows, notes, figures, args.json)


if __name__ == "__main__":
    main()
