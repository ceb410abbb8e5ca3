"""Benchmark 4 (+6): what the sweep layer costs, and the memory of its trials.

The same 8 trials (fixed configs: seeds 0-7 of one loss setting; no search, no pruning) run
(a) in this process one after another, each with the torch threads one trial gets in the sweep,
    `harness.trial.Trial` stepped to the end and its outputs written (what `harness run` does);
(b) by the sweep layer (`harness.sweep.tune.run_sweep`: Ray Tune, `reuse_actors`, checkpoints, MLflow
    child runs, images as artifacts) with 2 concurrent trials of 1 CPU each; on a machine with a
    GPU every trial runs on it and the C concurrent trials share it (1/C GPU each), so
    `--concurrency 4` measures 4 trials sharing one GPU against 1 trial alone on it.
Reported: trial-epochs per second of each, the overhead ratio = (b) wall / ((a) time / 2), also
without Ray's start-up, the share of a trial's time its classifier cache hit costs, and peak
memory: of the in-process trials (ru_maxrss) and, during (b), of the largest Ray worker and of the
whole process tree (PSS).

    python benchmarks/sweep_overhead.py [--trials 8] [--epochs 4] [--steps 40]
"""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from common import parser, report
from procmem import PeakMemory


def base_config(args) -> dict:
    return {
        "data": {"train_size": args.train_size},
        "loss": {"ce": 1.0, "tv": 0.3, "bn": 0.1},
        "train": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": 64, "eval_every": args.epochs},
        "eval": {"per_class": args.per_class},
    }


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--train-size", type=int, default=500)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=2, help="concurrent trials in (b)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (= torch threads) per trial")
    p.add_argument("--address", default=None, help="run on this Ray cluster (default: a local Ray)")
    args = p.parse_args(argv)
    if args.tiny:
        args.trials, args.epochs, args.steps, args.train_size, args.per_class = 2, 2, 2, 200, 5

    from harness.config import build_config, deep_merge
    from harness.trial import Trial

    base = base_config(args)
    base["classifier"] = {"epochs": 2} if args.tiny else {}
    if args.tiny:
        base["evaluator"] = {"epochs": 1}
        base["eval"].update(topk=3, diversity_pairs=20, reference_per_class=10)
    # warm the caches first (classifier, evaluator, reference points): both arms then hit them
    Trial(build_config(deep_merge(base, {"train": {"epochs": 1}})))

    # (a) in-process, sequential, with the threads each trial gets in the sweep (and the GPU, if any)
    cache_seconds, trial_seconds = [], []
    start_a = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.trials):
            t0 = time.perf_counter()
            trial = Trial(build_config(deep_merge(base, {"seed": seed, "threads": args.cpus_per_trial})))
            while not trial.done:
                trial.step()
            trial.write_outputs(Path(tmp) / str(seed))
            elapsed = time.perf_counter() - t0
            trial_seconds.append(elapsed)
            cache_seconds.append(trial.classifier_info["seconds"])
    time_a = time.perf_counter() - start_a
    rss_a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # (b) the sweep layer, `concurrency` trials at a time
    from harness.sweep.tune import init_ray, run_sweep
    from harness.sweep.files import SweepConfig

    import torch

    gpu = 1.0 / args.concurrency if torch.cuda.is_available() else 0.0  # C trials share one GPU
    sweep = SweepConfig.model_validate({
        "name": "bench-overhead", "base": deep_merge(base, {"seed": 0}),
        "asha": {"enabled": False}, "budget": {"num_samples": args.trials},
        "resources": {"cpu": args.cpus_per_trial, "gpu": gpu, "max_concurrent": args.concurrency},
        "stop": {"collapse_patience": 10 ** 6}, "checkpoint_every": args.epochs})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        init_ray(args.address, num_cpus=args.concurrency * args.cpus_per_trial)
        import ray
        # on a cluster this run only joined, its workers are found under that cluster's raylets (and no other Ray's)
        cluster = ray.get_runtime_context().gcs_address if args.address else None
        ray_start = time.perf_counter() - t0
        with PeakMemory(match="ray::", cluster=cluster) as mem:
            t1 = time.perf_counter()
            outcomes = run_sweep(sweep, Path(tmp) / "sweep")
            time_b = time.perf_counter() - t1
        import ray
        ray.shutdown()
    rows_b = outcomes[0].rows
    finished = sum(1 for r in rows_b if not r["error"] and r["metrics"].get("epoch") == args.epochs)

    cache_share = [c / t for c, t in zip(cache_seconds, trial_seconds)]
    trial_epochs = args.trials * args.epochs
    ideal = time_a / args.concurrency
    rows = [
        [f"(a) in-process, sequential, {args.cpus_per_trial} thread(s)", time_a, trial_epochs / time_a, "-"],
        [f"(b) harness sweep, {args.concurrency} concurrent x {args.cpus_per_trial} CPU"
         + (f" + {gpu:.2g} GPU" if gpu else ""), time_b, trial_epochs / time_b, time_b / ideal],
        ["(b) + Ray start-up", time_b + ray_start, trial_epochs / (time_b + ray_start), (time_b + ray_start) / ideal],
    ]
    figures = {"throughput_b_vs_a": time_a / time_b, "gpu_per_trial": gpu, "trials": args.trials, "epochs": args.epochs, "steps": args.steps, "time_a_s": time_a,
               "time_b_s": time_b, "ray_start_s": ray_start, "overhead_ratio": time_b / ideal,
               "overhead_ratio_with_ray_start": (time_b + ray_start) / ideal, "finished_b": finished,
               "trial_seconds_a": trial_seconds, "cache_hit_seconds": cache_seconds,
               "cache_hit_share_max": max(cache_share),
               "peak_rss_in_process_trials_mb": rss_a / 2 ** 20,
               "peak_rss_ray_worker_mb": mem.peak_process_rss / 2 ** 20,
               "peak_pss_sweep_tree_mb": mem.peak_total_pss / 2 ** 20}
    report(f"Sweep overhead: {args.trials} fixed trials x {args.epochs} epochs x {args.steps} steps "
           f"(N = {args.train_size}, batch 64)",
           ["arm", "wall s", "trial-epochs / s", "overhead ratio"], rows,
           [f"overhead ratio = (b) wall / ((a) / {args.concurrency}); throughput of (b) = {time_a / time_b:.2f}x (a)'s; "
            f"{finished}/{args.trials} sweep trials ran all "
            f"{args.epochs} epochs (no pruning).",
            f"classifier cache hit: {1e3 * sum(cache_seconds) / len(cache_seconds):.0f} ms on average, at most "
            f"{100 * max(cache_share):.2f}% of a trial's time (mean trial {sum(trial_seconds) / len(trial_seconds):.1f} s).",
            f"peak memory: in-process trials {rss_a / 2 ** 20:.0f} MB RSS (this process); during (b) the largest "
            f"Ray worker {mem.peak_process_rss / 2 ** 20:.0f} MB RSS, the whole tree (driver, Ray, "
            f"{args.concurrency} workers) {mem.peak_total_pss / 2 ** 20:.0f} MB PSS."],
           figures, args.json)


if __name__ == "__main__":
    main()
