"""Benchmark 1: classifier pretraining, the harness's path vs the usual research-code loop.

Same model (2-block avg-pool CNN), same optimiser (Adam 1e-3), batch 100, same epochs, same seed,
all 60,000 MNIST training images, in one run:
- reference: torchvision MNIST with ToTensor + Normalize transforms, DataLoader(shuffle=True);
- harness:   `harness.classifiers.fit`: the split loaded once as a tensor in [-1, 1] on the device,
             batches by indexing a random permutation.
Prints samples/s, final test accuracy, the ratio, and the share of the machine's matmul rate the
training loop reaches (FLOPs of one step counted by torch's FlopCounterMode).

    python benchmarks/pretrain.py [--epochs 2] [--workers 0] [--device cpu|cuda]
"""
from __future__ import annotations

import time

from common import matmul_flops, parser, report, sync


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
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference loop")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from harness.classifiers import ShallowCNN, accuracy, fit
    from harness.config import DataConfig
    from harness.data import Split, data_root, full_test_set, train_subset
    from harness.trial import resolve_device

    device = resolve_device(args.device)
    epochs = 1 if args.tiny else args.epochs
    limit = 2000 if args.tiny else None
    data_cfg = DataConfig(dataset="mnist", train_size=60000)
    train, _ = train_subset(data_cfg)
    if limit:
        train = Split(train.images[:limit], train.labels[:limit])
    test = full_test_set(data_cfg)
    if args.tiny:
        test = Split(test.images[:1000], test.labels[:1000])

    rows, figures = [], {"epochs": epochs, "batch": args.batch, "train_images": len(train)}
    # reference first, then the harness path, same initial weights
    torch.manual_seed(args.seed)
    init = ShallowCNN(2, "avg").state_dict()
    ref_model = ShallowCNN(2, "avg")
    ref_model.load_state_dict(init)
    ref_rate = reference_loop(ref_model, str(data_root(data_cfg)), epochs, args.batch, args.workers, args.seed,
                              device, limit)
    ref_acc = accuracy(ref_model.eval(), test, device)

    model = ShallowCNN(2, "avg")
    model.load_state_dict(init)
    sync(device)
    start = time.perf_counter()
    fit(model, train, epochs, args.batch, 1e-3, 0.0, args.seed, device)
    sync(device)
    rate = len(train) * epochs / (time.perf_counter() - start)
    acc = accuracy(model, test, device)

    flops = step_flops(ShallowCNN(2, "avg"), args.batch, device)
    mm = matmul_flops(device, seconds=0.5 if args.tiny else 2.0)
    for name, r, a in (("reference: transforms + DataLoader", ref_rate, ref_acc), ("harness: preloaded tensors", rate, acc)):
        gflops = r / args.batch * flops / 1e9
        rows.append([name, r, a, gflops, gflops * 1e9 / mm])
        figures[name.split(":")[0]] = {"samples_per_s": r, "test_acc": a, "gflops": gflops, "matmul_share": gflops * 1e9 / mm}
    figures.update(speedup=rate / ref_rate, matmul_gflops=mm / 1e9, step_gflop=flops / 1e9)
    report(f"Pretraining: 2-block avg-pool CNN, {len(train):,} MNIST images x {epochs} epochs, batch {args.batch}, {device}",
           ["path", "samples/s", "test acc", "GFLOP/s", "share of matmul"], rows,
           [f"speedup harness / reference: {rate / ref_rate:.2f}x; fp32 matmul (1024^3) on this device: "
            f"{mm / 1e9:.0f} GFLOP/s; one training step = {flops / 1e9:.3f} GFLOP (FlopCounterMode).",
            f"reference DataLoader workers: {args.workers}"], figures, args.json)


if __name__ == "__main__":
    main()
