"""Benchmark 5: what ASHA saves in a loss-weight sweep, and what it costs in best score.

One loss-weight search (seeded TPE, the same sampler seed in every arm; with `--startup` >=
`--trials` every trial of every arm is drawn before any result is seen, so all arms try exactly
the same weights) run three ways on the same trials:
- full budget: no ASHA, no collapse stopper: every trial runs every epoch;
- ASHA: asha (grace period, reduction factor) prunes on `score`;
- ASHA + collapse stopper: the harness's default pruning.
Reported: trial-epochs spent, wall time, best score found, and the ratios to the full budget.

    python benchmarks/asha.py [--trials 24] [--epochs 8] [--steps 15] [--reduction-factor 3]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import parser, report
from procmem import PeakMemory


def sweep_dict(args, asha: bool, stopper: bool) -> dict:
    return {
        "name": "bench-asha",
        "base": {
            "data": {"train_size": args.train_size},
            "classifier": {"epochs": 2} if args.tiny else {},  # --tiny: the tests' tiny classifier, cached once
            "evaluator": {"epochs": 1} if args.tiny else {},
            "train": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": 32, "eval_every": 1},
            "eval": {"per_class": args.per_class, "topk": 5, "diversity_pairs": 50, "reference_per_class": 10},
        },
        "search": {
            "loss.cos": {"dist": "loguniform", "low": 0.01, "high": 1.0, "allow_off": True},
            "loss.ms": {"dist": "loguniform", "low": 0.01, "high": 1.0, "allow_off": True},
            "loss.bn": {"dist": "loguniform", "low": 0.01, "high": 1.0},
            "loss.tv": {"dist": "uniform", "low": 0.0, "high": 0.5},
        },
        "seed": args.seed,
        "tpe_startup_trials": args.startup,
        "asha": {"enabled": asha, "grace_period": args.grace, "reduction_factor": args.reduction_factor},
        "stop": {"collapse_patience": 3 if stopper else 10 ** 6},
        "budget": {"num_samples": args.trials},
        "resources": {"cpu": 1},
        "checkpoint_every": args.epochs,
    }


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--grace", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=3)
    p.add_argument("--startup", type=int, default=None, help="random trials before TPE (default: --trials)")
    p.add_argument("--train-size", type=int, default=200)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: all)")
    p.add_argument("--address", default=None, help="run on this Ray cluster (default: a local Ray)")
    args = p.parse_args(argv)
    if args.tiny:
        args.trials, args.epochs, args.steps, args.per_class = 2, 2, 2, 5
    args.startup = args.startup or args.trials

    from harness.sweep.tune import best_rows, init_ray, run_sweep
    from harness.sweep.files import SweepConfig

    init_ray(args.address, num_cpus=args.cpus)
    import ray
    # on a cluster this run only joined, its workers are found under that cluster's raylets (and no other Ray's)
    cluster = ray.get_runtime_context().gcs_address if args.address else None
    arms = [("full budget (no ASHA, no stopper)", False, False), ("ASHA", True, False),
            ("ASHA + collapse stopper (default)", True, True)]
    if args.tiny:  # the smoke test of the code path: the reference and the harness's default
        arms = [arms[0], arms[2]]
    rows, figures = [], {"trials": args.trials, "epochs": args.epochs, "arms": {}}
    full = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, asha, stopper) in enumerate(arms):
            sweep = SweepConfig.model_validate(sweep_dict(args, asha, stopper))
            start = time.perf_counter()
            with PeakMemory(match="ray::", cluster=cluster) as mem:
                outcome = run_sweep(sweep, Path(tmp) / str(i))[0]
            wall = time.perf_counter() - start
            worker_mb = mem.peak_process_rss / 2 ** 20
            ok = [r for r in outcome.rows if not r["error"]]
            epochs = sum(int(r["metrics"].get("epoch", 0)) for r in ok)
            # the harness's best trial: ranked at equal budget (harness.records.results.best_trials), so a trial
            # ASHA stopped early never wins with a score from a shorter budget
            chosen = best_rows([outcome], "score", "max", top=1)
            best = chosen[0]["metrics"]["score"] if chosen else 0.0
            best_any = max((r["metrics"].get("score", 0.0) for r in ok), default=0.0)
            if full is None:
                full = (epochs, best, wall)
            rows.append([name, epochs, epochs / full[0], wall, best, best / full[1] if full[1] else float("nan"),
                         best_any, worker_mb])
            figures["arms"][name] = {"trial_epochs": epochs, "wall_s": wall, "best_score": best,
                                     "best_score_any_budget": best_any, "peak_rss_ray_worker_mb": worker_mb,
                                     "configs": [r["config"] for r in ok]}
    import ray
    ray.shutdown()
    report(f"ASHA savings: {args.trials} loss-weight trials x up to {args.epochs} epochs "
           f"(grace {args.grace}, reduction {args.reduction_factor:g}), same weights in every arm",
           ["arm", "trial-epochs", "x full", "wall s", "best score", "x full", "highest score at any budget",
            "peak RSS of a Ray worker, MiB"],
           rows, ["best score = the score of the harness's best trial, ranked at equal budget (the trials that ran the "
                  "most epochs first); the last column is the highest score of any trial, a pruned one's from the "
                  "epoch it was stopped. Peak RSS: the largest Ray worker (trial actors are reused from trial "
                  "to trial), sampled every 0.5 s."],
           figures, args.json)


if __name__ == "__main__":
    main()
