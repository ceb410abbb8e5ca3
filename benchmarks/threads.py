"""Thread discipline: concurrent trials with torch threads = their CPUs, and without.

Runs the default trial's generator steps (CE + TV + BN, batch 64) in P processes at once:
- alone: one process, all cores' threads (the single-trial reference);
- disciplined: P processes with cores / P threads each (what the sweep gives a 1-CPU trial);
- oversubscribed: P processes with all cores' threads each (torch's default in every process).
Reported: ms per step of each process and the aggregate steps/s.

    python benchmarks/threads.py [--procs 2] [--steps 40]
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time

from common import parser, report


def worker(threads: int, steps: int, overrides: list[str], start, out) -> None:
    import torch

    torch.set_num_threads(threads)
    from harness.config import build_config
    from harness.trial import Trial

    trial = Trial(build_config({"threads": threads}, overrides))
    trial.cfg.train.steps_per_epoch = 2
    trial.train_epoch()  # warm-up
    trial.cfg.train.steps_per_epoch = steps
    start.wait()  # every process starts stepping together
    t0 = time.perf_counter()
    trial.train_epoch()
    out.put((time.perf_counter() - t0) / steps)


def run_arm(procs: int, threads: int, steps: int, overrides: list[str]) -> list[float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(threads, steps, overrides, start, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    results = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return results


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    overrides = []
    if args.tiny:  # the classifier and evaluator of the tests' tiny trials (tests/conftest.py): cached once for all
        args.steps = 2
        overrides = ["data.train_size=200", "classifier.epochs=2", "evaluator.epochs=1", "eval.per_class=5",
                     "eval.reference_per_class=10", "eval.diversity_pairs=20", "train.batch_size=16"]
    # build the caches once, so no process trains a classifier while the others step
    from harness.config import build_config
    from harness.trial import Trial
    Trial(build_config({}, overrides))

    cores, procs = args.cores, args.procs
    arms = [("alone", 1, cores), ("disciplined", procs, max(1, cores // procs)), ("oversubscribed", procs, cores)]
    if args.tiny:  # the smoke test: the two arms the discipline is about
        arms = arms[1:]
    rows, figures = [], {"cores": cores, "procs": procs, "steps": args.steps, "arms": {}}
    for name, n, threads in arms:
        per_step = run_arm(n, threads, args.steps, overrides)
        agg = sum(1 / s for s in per_step)
        rows.append([name, n, threads, 1e3 * min(per_step), 1e3 * max(per_step), agg])
        figures["arms"][name] = {"procs": n, "threads": threads, "ms_per_step": [1e3 * s for s in per_step],
                                 "aggregate_steps_per_s": agg}
    slow = max(figures["arms"]["oversubscribed"]["ms_per_step"]) / max(figures["arms"]["disciplined"]["ms_per_step"])
    figures["oversubscribed_slowest_vs_disciplined"] = slow
    report(f"Thread discipline: {procs} concurrent trials on {cores} cores",
           ["arm", "processes", "threads each", "fastest ms/step", "slowest ms/step", "aggregate steps/s"], rows,
           [f"slowest oversubscribed process vs slowest disciplined one: {slow:.1f}x slower per step."],
           figures, args.json)


if __name__ == "__main__":
    main()
