"""Shared pieces of the benchmarks: the machine's description, its matrix-multiply rate measured
in the same run, a table printer and a JSON dump of every figure."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tests and CI read the data from the shared folder beside the checkout; elsewhere torchvision
# downloads into HARNESS_DATA_ROOT (or the user cache).
_shared = REPO.parent / "shared" / "datasets"
if "HARNESS_DATA_ROOT" not in os.environ and _shared.is_dir():
    os.environ["HARNESS_DATA_ROOT"] = str(_shared)


class _Parser(argparse.ArgumentParser):
    """With --check-args: parse, print the arguments as JSON and exit, running nothing (how
    `benchmarks/gpu_check.sh --dry-run` checks the command lines it would run)."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.check_args:
            print(json.dumps({k: v for k, v in vars(parsed).items() if k != "check_args"}, default=str))
            sys.exit(0)
        return parsed


def parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description)
    p.add_argument("--tiny", action="store_true", help="a seconds-long run of the same code (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--check-args", action="store_true", help="only parse the arguments, print them and exit")
    return p


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device, n: int = 1024, seconds: float = 2.0) -> float:
    """Achieved fp32 FLOP/s of an n x n matrix product on `device`, best of repeated timings."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n ** 3 / best


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (reads in a terminal and on a code-hosting site)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def report(title: str, headers: list[str], rows: list[list], notes: list[str], figures: dict,
           json_path: Path | None) -> None:
    print(f"\n## {title}\n\nmachine: {machine()}\n")
    print(table(headers, rows))
    for n in notes:
        print(f"\n{n}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"title": title, "machine": machine(), **figures}, indent=1, default=str))
    sys.stdout.flush()
