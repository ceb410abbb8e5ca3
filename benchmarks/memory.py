"""Benchmark 6: peak memory of one trial and of a 2-concurrent sweep.

- one trial: `harness run` of the default configuration (MNIST, N = 1000; fewer epochs, memory does
  not grow with them), and with `--large` the same at N = 60,000 (all of MNIST), each in its own process:
  peak RSS (the kernel's ru_maxrss of the child);
- a sweep: `harness sweep search_spaces/smoke.yaml` with 2 concurrent trials: the largest RSS of
  any Ray worker process and the peak total PSS of the whole process tree (driver, Ray's own
  processes, workers), sampled every 0.5 s.

    python benchmarks/memory.py [--epochs 2] [--large]
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

from common import REPO, parser, report
from procmem import PeakMemory

HARNESS = [sys.executable, "-m", "harness.cli"]


def child_peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a child process run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("this child used less memory than an earlier one; run one measurement per process")
    return after * 1024, time.perf_counter() - start


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--large", action="store_true", help="also one trial at N = 60,000 (pretrains its classifier once)")
    p.add_argument("--no-sweep", action="store_true", help="only the single trial (sweep_overhead.py also samples "
                   "a 2-concurrent sweep's memory)")
    args = p.parse_args(argv)
    short = [f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps}"]
    trials = [("one trial, default (N = 1,000)", short)]
    if args.large:
        trials.append(("one trial, N = 60,000", short + ["data.train_size=60000"]))
    sweep_sets = ["resources.max_concurrent=2"]
    if args.tiny:  # the classifier and evaluator of the tests' tiny trials (tests/conftest.py): cached once for all
        tiny = ["data.train_size=200", "classifier.epochs=2", "evaluator.epochs=1", "eval.per_class=5",
                "eval.reference_per_class=10", "eval.diversity_pairs=20", "train.epochs=1", "train.steps_per_epoch=2"]
        trials = [("one trial, tiny", tiny)]
        sweep_sets += ["budget.num_samples=2", "budget.epochs=2", "budget.steps_per_epoch=2"]

    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        # larger trials last: RUSAGE_CHILDREN keeps the maximum over all children
        for i, (name, sets) in enumerate(trials):
            cmd = HARNESS + ["run", "--quiet", "--out", f"{tmp}/run{i}"] + [a for s in sets for a in ("--set", s)]
            rss, secs = child_peak_rss(cmd)
            rows.append([name, rss / 2 ** 20, "-", secs])
            figures[name] = {"peak_rss_mb": rss / 2 ** 20, "seconds": secs}
        if args.no_sweep:
            report("Peak memory", ["what", "peak RSS of one trial process, MB", "-", "seconds"], rows, [], figures,
                   args.json)
            return
        cmd = HARNESS + ["sweep", "search_spaces/smoke.yaml", "--out", f"{tmp}/sweep"] + \
            [a for s in sweep_sets for a in ("--set", s)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
        with PeakMemory(proc.pid, match="ray::") as mem:
            if proc.wait() != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
        secs = time.perf_counter() - start
    rows.append(["sweep (smoke.yaml), 2 concurrent trials", mem.peak_process_rss / 2 ** 20, mem.peak_total_pss / 2 ** 20, secs])
    figures["sweep"] = {"peak_worker_rss_mb": mem.peak_process_rss / 2 ** 20,
                        "peak_tree_pss_mb": mem.peak_total_pss / 2 ** 20, "seconds": secs}
    report("Peak memory", ["what", "peak RSS of one trial process, MB", "peak PSS of the whole tree, MB", "seconds"],
           rows, ["RSS counts the shared torch/CUDA libraries in each process; PSS splits them between processes."],
           figures, args.json)


if __name__ == "__main__":
    main()
