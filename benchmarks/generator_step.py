"""Benchmark: the generator's training step with the KKT term over its full bank, before and now,
measured in the same run on the same generator and classifier (issue 30, item 2).

The configuration of the generator's leakage tests (search_spaces/loss_design_fresh_latents.yaml,
pooling_leakage_generator.yaml): ce 0.123 + pert 0.619 + kkt 2.06 + pixel 1, the KKT term over a bank
of 2n fixed codes G(bank_z) (`kkt_codes_per_class_per_100: 20`), all parameters (`kkt_layers: 0`),
the full estimator, margin `all`, batch 64, the classifier's ReLUs smoothed (relu_alpha 175 for the
MLP as loss_design, 56.5 for the CNN as pooling_leakage_generator). Classifiers freshly initialised,
as benchmarks/kkt_step.py's (no training, no data):

  MLP  the positive control's bias-free ReLU 784-1000-1000-10, input centred, n = 100 (bank 200);
  CNN  the CNN positive control's 1-block average-pool bias-free ReLU CNN, input centred, n = 20 (bank 40).

One step is `Trial.train_epoch`'s (called as is, `steps` steps an epoch): the generator on a batch,
the classifier on it (ce, pert, pixel), G(bank_z) and the KKT residual on it, the backward pass
restricted to what the optimiser steps, Adam. Two arms, alternating in segments, each segment from
the same initial state (generator, multipliers, Adam, BatchNorm statistics):

  before: the KKT residual by `kkt_residual_hooked` (the Gram form by forward hooks, autograd's double
          backward), patched in as the name harness/science/losses.py calls;
  now:    as the harness runs it (`kkt_residual`: the hand-written backward pass for these chains).

The KKT term's value and its gradients with respect to the generator's parameters and to the
multipliers are compared between the arms at the initial state (largest relative gap, of the value,
of the whole generator gradient and of each parameter tensor's). `--profile` adds torch.profiler's
top operators of the "now" step (one thread).

    python benchmarks/generator_step.py [--steps 5] [--segments 3] [--threads 1] [--profile]
"""
from __future__ import annotations

import contextlib
import statistics
import time

from common import parser, report, sync

LOSS = ["loss.ce=0.1229607110732571", "loss.tv=0", "loss.cos=0", "loss.bn=0", "loss.kkt=2.0554062603826995",
        "loss.pixel=1", "loss.pert=0.6190490166774184", "loss.kkt_layers=0", "loss.kkt_margin=all",
        "loss.kkt_estimator=full", "loss.kkt_lambda_init=0.01", "loss.kkt_codes_per_class_per_100=20",
        "generator.rescale=range", "train.batch_size=64", "train.jitter=0", "train.lr=0.0006042851578845063",
        "inverter=generator"]
MLP = ["classifier.arch=mlp", "classifier.widths=[1000,1000]", "classifier.norm=none", "classifier.bias=false",
       "classifier.activation=relu", "classifier.dropout=0", "classifier.center=true", "classifier.init_scale=0.1",
       "loss.kkt_lambda_min=0.0121", "train.relu_alpha=175"]
CNN = ["classifier.arch=cnn", "classifier.depth=1", "classifier.pool=avg", "classifier.norm=none",
       "classifier.bias=false", "classifier.activation=relu", "classifier.dropout=0", "classifier.center=true",
       "classifier.init_scale=0.1", "loss.kkt_lambda_min=0.03", "train.relu_alpha=56.5"]
ARMS = ("before", "now")


def config(settings: list[str], n: int, steps: int, tiny: bool):
    from harness.config import build_config

    if tiny:
        settings = [s if not s.startswith("classifier.widths") else "classifier.widths=[64,64]" for s in settings]
        settings = [*settings, "generator.channels=8", "train.batch_size=16"]
        if "classifier.arch=cnn" in settings:
            settings = [*settings, "classifier.channels=[8]"]
    # the bank is 2n codes also below kkt_min_codes' default (100), as the issue's configuration says
    return build_config(None, [*LOSS, *settings, f"data.train_size={n}", f"loss.kkt_min_codes={2 * n}",
                               f"train.steps_per_epoch={steps}"])


def setup(settings: list[str], n: int, steps: int, device, tiny: bool):
    """A trial of the configuration without its data, evaluator or pretraining: the classifier freshly
    initialised (seed 0), the generator, the loss terms and the optimiser as `Trial.__init__` builds
    them; `Trial.train_epoch` runs on it unchanged."""
    import torch

    from harness.science.classifiers import build_classifier
    from harness.science.inverters import build_inverter
    from harness.science.losses import build_loss_terms
    from harness.trial import Trial

    cfg = config(settings, n, steps, tiny)
    torch.manual_seed(0)
    classifier = build_classifier(cfg.classifier).to(device).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    trial = Trial.__new__(Trial)
    trial.cfg, trial.device, trial.classifier = cfg, device, classifier
    torch.manual_seed(cfg.seed)
    trial.inverter = build_inverter(cfg, device, getattr(classifier, "input_mean", None))
    trial.terms = build_loss_terms(cfg.loss, classifier, trial.inverter, cfg.data.train_size, cfg.generator_batch,
                                   cfg.seed).to(device)
    trial.weights = {name: getattr(cfg.loss, name) for name in trial.terms}
    trial.optimizer = trial.inverter.make_optimizer(list(trial.terms.parameters()))
    trial.trainable = [p for g in trial.optimizer.param_groups for p in g["params"] if p.requires_grad]
    trial.rng = torch.Generator().manual_seed(cfg.seed)
    trial.epoch, trial.train_seconds, trial.resumed = 0, 0.0, False
    trial.distill_targets, trial.distill_info = None, {}
    return trial


@contextlib.contextmanager
def arm_residual(arm: str):
    """`before`: harness.science.losses' kkt_residual replaced by kkt_residual_hooked."""
    from harness.science import kkt, losses

    original = losses.kkt_residual
    losses.kkt_residual = kkt.kkt_residual_hooked if arm == "before" else original
    try:
        yield
    finally:
        losses.kkt_residual = original


def snapshot(trial) -> dict:
    import copy

    return {"inverter": copy.deepcopy(trial.inverter.state_dict()), "terms": copy.deepcopy(trial.terms.state_dict()),
            "optimizer": copy.deepcopy(trial.optimizer.state_dict()), "rng": trial.rng.get_state()}


def restore(trial, state: dict) -> None:
    import torch

    trial.inverter.load_state_dict(state["inverter"])
    trial.terms.load_state_dict(state["terms"])
    trial.optimizer.load_state_dict(state["optimizer"])
    trial.rng.set_state(state["rng"])
    trial.epoch = 0
    torch.manual_seed(0)


def kkt_term_and_grads(trial, arm: str):
    """The KKT term at the trial's state and its gradients: the generator's parameters (each tensor)
    and the multipliers."""
    import torch

    from harness.science.classifiers import smoothed_relu

    term = trial.terms["kkt"]
    params = [p for p in trial.inverter.generator.parameters() if p.requires_grad]
    trial.inverter.train()
    with arm_residual(arm), smoothed_relu(trial.classifier, trial.cfg.train.relu_alpha):
        value = term(None)
        grads = torch.autograd.grad(value, [*params, term.a])
    return value.detach(), grads[:-1], grads[-1]


def gaps(trial) -> dict[str, float]:
    """Relative gaps |before − now| / |before| of the KKT term, the whole generator gradient, the worst
    parameter tensor's gradient and the multipliers' gradient."""
    import torch

    (v0, g0, a0), (v1, g1, a1) = (kkt_term_and_grads(trial, arm) for arm in ARMS)

    def rel(u, v):
        return ((u - v).norm() / u.norm().clamp_min(1e-30)).item()

    flat0, flat1 = torch.cat([g.flatten() for g in g0]), torch.cat([g.flatten() for g in g1])
    out = {"value": rel(v0, v1), "generator_grad": rel(flat0, flat1),
           "generator_grad_worst_tensor": max(rel(u, v) for u, v in zip(g0, g1)), "multiplier_grad": rel(a0, a1),
           "kkt_term": v1.item()}
    out["largest"] = max(out["value"], out["generator_grad"], out["multiplier_grad"])
    return out


def time_arms(trial, warm_cfg, segments: int, device) -> dict[str, float]:
    state = snapshot(trial)
    cfg, steps = trial.cfg, trial.cfg.train.steps_per_epoch
    times = {arm: [] for arm in ARMS}
    for _ in range(segments):
        for arm in ARMS:
            with arm_residual(arm):
                restore(trial, state)
                trial.cfg = warm_cfg  # one warm-up step
                trial.train_epoch()
                trial.cfg = cfg
                sync(device)
                start = time.perf_counter()
                losses = trial.train_epoch()
                sync(device)
                times[arm].append((time.perf_counter() - start) / steps)
            assert all(v == v for v in losses.values()), losses  # finite
    restore(trial, state)
    return {arm: statistics.median(v) for arm, v in times.items()}


def components(trial, segments: int, device) -> dict[str, float]:
    """Where a step's time goes, each part timed alone (forward + backward, median of alternating
    repeats): the KKT residual by each arm on the bank's images held fixed, and the generator's pass
    over the bank (G(bank_z) and its backward into the generator's parameters)."""
    import torch

    from harness.science import kkt
    from harness.science.classifiers import smoothed_relu

    term, inverter = trial.terms["kkt"], trial.inverter
    idx = torch.arange(term.num_codes, device=term.a.device)
    params = [p for p in inverter.generator.parameters() if p.requires_grad]
    with torch.no_grad():
        x = inverter.kkt_images(idx).detach()
    x.requires_grad_(True)
    cotangent = torch.randn_like(x)

    def residual(fn):
        def run():
            with smoothed_relu(trial.classifier, trial.cfg.train.relu_alpha):
                r = fn(trial.classifier, kkt.theta_params(trial.classifier, trial.terms["kkt"].layers), x,
                       term.bank_y, term.lam)
            torch.autograd.grad(r, [x, term.a])
        return run

    def bank_pass():
        torch.autograd.grad(inverter.kkt_images(idx), params, cotangent)

    parts = {"residual_before": residual(kkt.kkt_residual_hooked), "residual_now": residual(kkt.kkt_residual),
             "generator_bank_pass": bank_pass}
    times = {k: [] for k in parts}
    for _ in range(max(segments, 2)):
        for k, fn in parts.items():
            fn()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - start)
    return {f"ms_{k}": statistics.median(v) * 1e3 for k, v in times.items()}


def profile_now(trial, warm_cfg, top: int) -> list[dict]:
    """torch.profiler's top operators (self CPU time) over one `now` step, after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    state = snapshot(trial)
    cfg = trial.cfg
    trial.cfg = warm_cfg
    trial.train_epoch()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trial.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trial.train_epoch()
    trial.cfg = cfg
    restore(trial, state)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "self_share": e.self_cpu_time_total / total, "total_ms": e.cpu_time_total / 1e3}
            for e in events[:top]]


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="steps per timed segment")
    p.add_argument("--segments", type=int, default=3, help="alternating segments per arm")
    p.add_argument("--mlp-n", type=int, default=100, help="training-set size n of the MLP case (bank 2n)")
    p.add_argument("--cnn-n", type=int, default=20, help="training-set size n of the CNN case (bank 2n)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="also profile one `now` step of each case")
    p.add_argument("--top", type=int, default=12, help="operators listed by --profile")
    args = p.parse_args(argv)

    import torch

    from harness.trial import resolve_device

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = resolve_device(args.device)
    steps, segments = (2, 1) if args.tiny else (args.steps, args.segments)
    cases = [("MLP", MLP, 10 if args.tiny else args.mlp_n), ("CNN 1-block", CNN, 10 if args.tiny else args.cnn_n)]
    rows, notes = [], []
    figures = {"threads": args.threads, "steps": steps, "segments": segments, "cases": {}}
    for label, settings, n in cases:
        trial = setup(settings, n, steps, device, args.tiny)
        warm_cfg = config(settings, n, 1, args.tiny)
        bank = trial.terms["kkt"].num_codes
        g = gaps(trial)
        t = time_arms(trial, warm_cfg, segments, device)
        parts = components(trial, segments, device)
        case = {"n": n, "bank": bank, "batch": trial.cfg.generator_batch,
                "classifier_parameters": sum(p.numel() for p in trial.classifier.parameters()),
                "generator_parameters": sum(p.numel() for p in trial.inverter.generator.parameters()),
                **{f"ms_{arm}": t[arm] * 1e3 for arm in ARMS}, "speedup": t["before"] / t["now"],
                "relative_gap": g, "parts": parts,
                # the step of `now` with its KKT residual taking no time at all: the most a faster
                # residual could give over `before`
                "speedup_ceiling_residual_free": t["before"] * 1e3 / max(t["now"] * 1e3 - parts["ms_residual_now"], 1e-9)}
        if args.profile:
            case["profile_now"] = profile_now(trial, warm_cfg, args.top)
            notes.append(f"Top operators of one `now` step, {label} n={n} (self CPU time):\n\n" + "\n".join(
                f"- {e['op']}: {e['self_ms']:.1f} ms ({100 * e['self_share']:.0f}%), {e['calls']} calls"
                for e in case["profile_now"]))
        figures["cases"][f"{label} n={n}"] = case
        rows.append([f"{label} n={n}", bank, t["before"] * 1e3, t["now"] * 1e3, t["before"] / t["now"],
                     g["largest"], parts["ms_residual_before"], parts["ms_residual_now"], parts["ms_generator_bank_pass"],
                     case["speedup_ceiling_residual_free"]])
    report(f"Generator step, KKT over the full bank of 2n codes, before and now ({device}, {args.threads} "
           f"thread(s), median of {segments} alternating segments of {steps} steps)",
           ["classifier", "bank", "ms before", "ms now", "speedup", "largest relative gap (kkt term, gradients)",
            "residual alone: ms before", "ms now", "G(bank_z) fwd+bwd ms", "ceiling: residual free"],
           rows, ["before: the KKT residual by kkt_residual_hooked; now: as the harness runs it. Gap: the KKT term's "
                  "value and its gradients in the generator's parameters and in the multipliers, between the arms, "
                  "at the same state. Parts timed alone: the residual's forward + backward on the bank's images held "
                  "fixed, and the generator's forward + backward over the bank. Ceiling: ms before / (ms now − the "
                  "residual's ms now), the speedup if the residual cost nothing.", *notes], figures, args.json)


if __name__ == "__main__":
    main()
