"""Benchmark 1: classifier pretraining, the harness's path vs the usual research-code loop.

Same model (2-block avg-pool CNN), same optimiser (Adam 1e-3), batch 100, same epochs, same seed,
all 60,000 MNIST training images, in one run:
- reference: torchvision MNIST with ToTensor + Normalize transforms, DataLoader(shuffle=True);
- harness, contiguous: `harness.science.classifiers.fit` as the harness runs it (default memory format):
             the split loaded once as a tensor in [-1, 1] on the device, batches by indexing a
             random permutation (the JSON's `harness`);
- harness, channels_last: the same with `fit(channels_last=True)`. Also how far one step's
             gradients in each layout are from float64 (torch's channels_last BatchNorm kernels
             for training are less precise on a CPU).
Prints samples/s, final test accuracy, the ratios, and the share of the machine's matmul rate the
training loop reaches (FLOPs of one step counted by torch's FlopCounterMode; the matmul rate is
measured before and after the arms, the higher one counts). On a shared machine the load moves
between arms, so the two layouts are also timed in alternation on short segments (the median
ratio of --rounds pairs).
Then the gd path of the reconstruction regime's classifier (search_spaces/trials/
positive_control.yaml: full-batch gradient descent of the 1.79 M-parameter MLP on n = 100):
seconds for its --gd-steps steps, FLOP/s and share of the matmul rate.

    python benchmarks/pretrain.py [--epochs 2] [--train-images 60000] [--gd-steps 3000] [--threads N]
                                  [--device cpu|cuda]
"""
from __future__ import annotations

import statistics
import time

from common import REPO, matmul_flops, parser, report, sync


def reference_loop(model, root: str, epochs: int, batch: int, workers: int, seed: int, device, limit: int | None):
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    ds = datasets.MNIST(root, train=True, transform=tf, download=True)
    if limit:
        ds = Subset(ds, range(limit))
    torch.manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.to(device).train()
    sync(device)
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x)[0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - start)


def timed_fit(model, data, epochs: int, batch: int, seed: int, device, channels_last: bool | None):
    """(samples/s, CPU seconds of this process) of `harness.science.classifiers.fit`."""
    from harness.science.classifiers import fit

    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fit(model, data, epochs, batch, 1e-3, 0.0, seed, device, channels_last=channels_last)
    sync(device)
    return len(data) * epochs / (time.perf_counter() - start), time.process_time() - cpu


def interleaved_ratio(data, batch: int, rounds: int, device) -> list[float]:
    """channels_last / contiguous throughput on the same short segment, timed in alternation."""
    from harness.science.classifiers import ShallowCNN

    ratios = []
    for r in range(rounds):
        rate = {}
        for layout in ((False, True) if r % 2 == 0 else (True, False)):
            torch_seed(r)
            rate[layout], _ = timed_fit(ShallowCNN(2, "avg"), data, 1, batch, r, device, layout)
        ratios.append(rate[True] / rate[False])
    return ratios


def gradient_error(batch: int, seed: int) -> dict[str, float]:
    """How far one training step's gradients in each layout are from the same step in float64
    (on the CPU, real images): the largest deviation over all parameters, relative to the largest
    gradient entry."""
    import torch
    import torch.nn.functional as F

    from harness.science.classifiers import ShallowCNN
    from harness.config import DataConfig
    from harness.science.data import train_subset

    data, _ = train_subset(DataConfig(dataset="mnist", train_size=batch))
    torch.manual_seed(seed)
    init = ShallowCNN(2, "avg").state_dict()

    def grads(dtype, layout):
        model = ShallowCNN(2, "avg").train()
        model.load_state_dict(init)
        model = model.to(dtype).to(memory_format=layout)
        torch.manual_seed(seed)  # the same dropout masks
        x = data.images.to(dtype).contiguous(memory_format=layout)
        F.cross_entropy(model(x)[0], data.labels).backward()
        return [p.grad.double() for p in model.parameters()]

    exact = grads(torch.float64, torch.contiguous_format)
    scale = max(g.abs().max().item() for g in exact)
    return {name: max((g - e).abs().max().item() for g, e in zip(grads(torch.float32, layout), exact)) / scale
            for name, layout in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last))}


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def gd_figures(steps: int, tiny: bool, device, mm: float, rounds: int) -> dict:
    """Full-batch gradient descent of the positive control's classifier, `steps` steps, timed; then
    the fused SGD update against the multi-pass one (fit_gd's before) in alternating segments from
    the same start, with the largest difference of the weights they reach."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from harness.science.classifiers import build_classifier, count_parameters, fit_gd, training_state
    from harness.config import build_config, load_yaml
    from harness.science.data import classifier_training_set

    torch.set_flush_denormal(True)  # as a trial sets it before it pretrains (harness.trial.Trial)
    overrides = [f"classifier.steps={steps}"] + (["classifier.widths=[64,64]"] if tiny else [])
    cfg = build_config(load_yaml(REPO / "search_spaces" / "trials" / "positive_control.yaml"), overrides)
    c = cfg.classifier
    data = classifier_training_set(cfg.data)

    def fresh():
        torch.manual_seed(c.seed)
        return build_classifier(c, data.images.mean(0))

    def timed(model, n: int, fused: bool) -> float:
        sync(device)
        start = time.perf_counter()
        fit_gd(model, data, n, c.lr, c.momentum, c.weight_decay, device, c.warmup_steps, fused=fused)
        sync(device)
        return time.perf_counter() - start

    model = fresh().to(device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(data.images.to(device))[0], data.labels.to(device)).backward()
    flops = float(counter.get_total_flops())
    model = fresh()
    seconds = timed(model, c.steps, fused=True)
    state = training_state(model, data, c.weight_decay, device)
    segment = min(c.steps, 10 if tiny else 100)
    ratios, weight_diff = [], 0.0
    for r in range(rounds):
        models, took = {}, {}
        for fused in ((False, True) if r % 2 == 0 else (True, False)):
            models[fused] = fresh()
            took[fused] = timed(models[fused], segment, fused)
        ratios.append(took[False] / took[True])
        a, b = models[False].state_dict(), models[True].state_dict()
        weight_diff = max(weight_diff, max((a[k] - b[k]).abs().max().item() for k in a))
    return {"steps": c.steps, "images": len(data), "parameters": count_parameters(model), "seconds": seconds,
            "ms_per_step": seconds / c.steps * 1e3, "step_gflop": flops / 1e9,
            "gflops": flops * c.steps / seconds / 1e9, "matmul_share": flops * c.steps / seconds / mm,
            "train_acc": state["train_acc"], "train_loss": state["train_loss"],
            "fused_vs_multipass": ratios, "fused_vs_multipass_median": statistics.median(ratios),
            "segment_steps": segment, "max_weight_diff_fused": weight_diff}


def gd_note(gd: dict) -> str:
    return (f"gd path of the positive control's classifier ({gd['parameters'] / 1e6:.2f} M parameters, "
            f"n = {gd['images']}, full batch): {gd['steps']:,} steps in {gd['seconds']:.1f} s "
            f"({gd['ms_per_step']:.1f} ms/step, {gd['step_gflop']:.3f} GFLOP/step -> {gd['gflops']:.0f} "
            f"GFLOP/s, {100 * gd['matmul_share']:.0f}% of the matmul rate); ends at training accuracy "
            f"{gd['train_acc']:.2f}, loss {gd['train_loss']:.2g}. Fused SGD update vs the multi-pass one: "
            f"median {gd['fused_vs_multipass_median']:.2f}x over {len(gd['fused_vs_multipass'])} alternating "
            f"{gd['segment_steps']}-step segments ({', '.join(f'{r:.2f}' for r in gd['fused_vs_multipass'])}); "
            f"largest weight difference {gd['max_weight_diff_fused']:.3g}.")


def step_flops(model, batch: int, device) -> float:
    """FLOPs of one training step (forward + backward) of `model` at `batch`."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model.to(device).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x)[0], y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--train-images", type=int, default=None, help="the first N training images (default: all)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference loop")
    p.add_argument("--rounds", type=int, default=6, help="alternating contiguous/channels_last segment pairs")
    p.add_argument("--gd-steps", type=int, default=3000, help="steps of the positive control's gd path (0: skip)")
    p.add_argument("--gd-only", action="store_true", help="only the gd path (no CNN arms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from harness.science.classifiers import ShallowCNN, accuracy
    from harness.config import DataConfig
    from harness.science.data import Split, data_root, full_test_set, train_subset
    from harness.trial import resolve_device

    device = resolve_device(args.device)
    epochs = 1 if args.tiny else args.epochs
    limit = 2000 if args.tiny else args.train_images
    rounds = 2 if args.tiny else args.rounds
    gd_steps = min(args.gd_steps, 20) if args.tiny else args.gd_steps
    data_cfg = DataConfig(dataset="mnist", train_size=60000)
    train, _ = train_subset(data_cfg)
    if limit:
        train = Split(train.images[:limit], train.labels[:limit])
    test = full_test_set(data_cfg)
    if args.tiny:
        test = Split(test.images[:1000], test.labels[:1000])

    figures = {"epochs": epochs, "batch": args.batch, "train_images": len(train), "threads": torch.get_num_threads()}
    mm_before = matmul_flops(device, seconds=0.5 if args.tiny else 2.0)
    if args.gd_only:
        gd = gd_figures(gd_steps, args.tiny, device, mm_before, rounds)
        report(f"Pretraining: the gd path of the positive control's classifier, {device}",
               ["path", "steps", "seconds", "ms / step", "GFLOP/s", "share of matmul"],
               [["gd, full batch", gd["steps"], gd["seconds"], gd["ms_per_step"], gd["gflops"], gd["matmul_share"]]],
               [gd_note(gd), f"fp32 matmul (1024^3) on this device: {mm_before / 1e9:.0f} GFLOP/s"],
               {**figures, "gd": gd, "matmul_gflops": mm_before / 1e9}, args.json)
        return
    # the same initial weights in every arm
    torch.manual_seed(args.seed)
    init = ShallowCNN(2, "avg").state_dict()

    def model():
        m = ShallowCNN(2, "avg")
        m.load_state_dict(init)
        return m

    ref_model = model()
    cpu = time.process_time()
    ref_rate = reference_loop(ref_model, str(data_root(data_cfg)), epochs, args.batch, args.workers, args.seed,
                              device, limit)
    arms = {"reference": (ref_rate, time.process_time() - cpu, accuracy(ref_model.eval(), test, device))}
    models = {}
    for name, layout in (("harness_contiguous", False), ("harness_channels_last", True)):
        models[name] = model()
        rate, cpu_s = timed_fit(models[name], train, epochs, args.batch, args.seed, device, layout)
        arms[name] = (rate, cpu_s, accuracy(models[name], test, device))
    default = "harness_contiguous"  # what fit does unless asked for channels_last
    a, b = models["harness_contiguous"].state_dict(), models["harness_channels_last"].state_dict()
    weight_diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    steps = 5 if args.tiny else 20  # per segment
    segment = Split(train.images[:steps * args.batch], train.labels[:steps * args.batch])
    ratios = interleaved_ratio(segment, args.batch, rounds, device)
    mm_after = matmul_flops(device, seconds=0.5 if args.tiny else 2.0)
    mm = max(mm_before, mm_after)
    grad_error = gradient_error(args.batch, args.seed)

    flops = step_flops(ShallowCNN(2, "avg"), args.batch, device)
    labels = {"reference": "reference: transforms + DataLoader", "harness_contiguous": "harness, contiguous",
              "harness_channels_last": "harness, channels_last"}
    labels[default] += " (fit's default)"
    rows = []
    for name, (rate, cpu_s, acc) in arms.items():
        gflops = rate / args.batch * flops / 1e9
        rows.append([labels[name], rate, len(train) * epochs / cpu_s, acc, gflops, gflops * 1e9 / mm])
        figures[name] = {"samples_per_s": rate, "samples_per_cpu_s": len(train) * epochs / cpu_s, "test_acc": acc,
                         "gflops": gflops, "matmul_share": gflops * 1e9 / mm}
    figures["harness"] = {**figures[default], "layout": default.split("_", 1)[1]}
    rate, old, new = arms[default][0], arms["harness_contiguous"][0], arms["harness_channels_last"][0]
    median = statistics.median(ratios)
    figures.update(speedup=rate / ref_rate, channels_last_speedup=new / old, channels_last_interleaved=ratios,
                   channels_last_interleaved_median=median, max_weight_diff_layouts=weight_diff,
                   test_acc_diff_layouts=arms["harness_channels_last"][2] - arms["harness_contiguous"][2],
                   gradient_error_vs_float64=grad_error,
                   matmul_gflops=mm / 1e9, matmul_gflops_before=mm_before / 1e9, matmul_gflops_after=mm_after / 1e9,
                   step_gflop=flops / 1e9)
    notes = [f"speedup harness ({default.split('_', 1)[1]}) / reference: {rate / ref_rate:.2f}x; channels_last / "
             f"contiguous: {new / old:.2f}x in the "
             f"full runs, median {median:.2f}x over {len(ratios)} alternating {len(segment):,}-image segments "
             f"({', '.join(f'{r:.2f}' for r in ratios)}).",
             f"fp32 matmul (1024^3) on this device: {mm / 1e9:.0f} GFLOP/s (before {mm_before / 1e9:.0f}, after "
             f"{mm_after / 1e9:.0f}); one training step = {flops / 1e9:.3f} GFLOP (FlopCounterMode).",
             f"contiguous vs channels_last after training: test accuracy {arms['harness_contiguous'][2]:.4f} vs "
             f"{arms['harness_channels_last'][2]:.4f}; largest weight difference {weight_diff:.3g}. One step's gradients "
             f"against float64 (largest deviation / largest gradient): contiguous {grad_error['contiguous']:.1e}, "
             f"channels_last {grad_error['channels_last']:.1e}.",
             f"reference DataLoader workers: {args.workers}"]
    if gd_steps:
        gd = gd_figures(gd_steps, args.tiny, device, mm, rounds)
        figures["gd"] = gd
        notes.append(gd_note(gd))
    report(f"Pretraining: 2-block avg-pool CNN, {len(train):,} MNIST images x {epochs} epochs, batch {args.batch}, {device}",
           ["path", "samples/s", "samples / CPU s", "test acc", "GFLOP/s", "share of matmul"], rows, notes, figures,
           args.json)


if __name__ == "__main__":
    main()
