"""The generator-inversion levers at equal wall time, and the frontier of what was tried.

Each arm is `harness run` with the baseline (the previous default: ce 1, tv 0.3, bn 0.1, no
jitter, on the default classifier) plus one lever, trained for the same number of seconds (`train.max_seconds`;
evaluation excluded), over several generator seeds on the same cached classifier. `--procs`
runs go at once with cores / procs torch threads each, every arm under the same conditions.
Reported per arm: steps reached, nn-SSIM, diversity, evaluator accuracy, collapsed runs,
train/held-out top-10%, and the change of nn-SSIM against the baseline measured in the same run.
The frontier figure puts every run at (diversity, nn-SSIM) beside the reference points.

    python benchmarks/levers.py [--seconds 60] [--seeds 3] [--procs 2] [--figure FILE.png]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, parser, report

# the previous default (no jitter, tv 0.3); each arm adds one lever to it
BASELINE = ["train.epochs=1000", "train.eval_every=1000", "train.jitter=0", "loss.tv=0.3"]
ARMS: dict[str, list[str]] = {
    "baseline (ce 1, tv 0.3, bn 0.1)": [],
    "train.jitter=2": ["train.jitter=2"],
    "loss.bn_form=norm": ["loss.bn_form=norm"],
    "train.tv_ramp_epochs=5": ["train.tv_ramp_epochs=5"],
    "train.batch_per_train_image=0.128 (batch 128)": ["train.batch_per_train_image=0.128"],
    "generator.channels=64": ["generator.channels=64"],
    "train.channels_last=true": ["train.channels_last=true"],
    "jitter 2 + tv 1 (the default)": ["train.jitter=2", "loss.tv=1"],
}
TINY = ["data.train_size=200", "classifier.epochs=2", "evaluator.epochs=1", "train.steps_per_epoch=3",
        "train.batch_size=20", "eval.per_class=10", "eval.topk=3", "eval.diversity_pairs=20",
        "eval.reference_per_class=10"]
KEYS = ("ssim_nn_train_mean", "diversity", "evaluator_acc", "collapsed", "train_top10", "heldout_top10",
        "unique_nn_frac", "epoch", "train_seconds")
REFS = ("ref_heldout_ssim", "ref_classmean_ssim", "ref_blank_ssim", "ref_heldout_diversity")


def one_run(overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "harness.cli", "run", "--quiet", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(overrides)}: exit {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="training seconds of every run")
    p.add_argument("--seeds", type=int, default=3, help="generator seeds per arm (0, 1, ...)")
    p.add_argument("--procs", type=int, default=2, help="runs at once (each with cores / procs threads)")
    p.add_argument("--figure", type=Path, default=None, help="write the frontier figure here")
    p.add_argument("--replot", type=Path, default=None, help="only redraw --figure from this saved --json file")
    p.add_argument("--extra", action="append", default=[], help="with --replot: one more configuration, "
                   "label:diversity:nn-SSIM (repeatable)")
    args = p.parse_args()
    if args.replot:
        replot(args.replot, args.figure, args.extra)
        return
    arms = dict(ARMS)
    seconds = 0.5 if args.tiny else args.seconds
    seeds = 1 if args.tiny else args.seeds
    if args.tiny:
        arms = dict(list(arms.items())[:2])
    threads = max(1, (os.cpu_count() or 1) // args.procs)
    common = [*BASELINE, f"train.max_seconds={seconds}", f"threads={threads}", f"device={args.device}",
              *(TINY if args.tiny else [])]
    jobs = [(name, seed) for name in arms for seed in range(seeds)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.procs) as pool:
        # the first run alone builds the cache (classifier, evaluator, reference points) for all
        first = one_run([*common, *arms[jobs[0][0]], f"seed={jobs[0][1]}"], Path(tmp) / "0")
        futures = [pool.submit(one_run, [*common, *arms[name], f"seed={seed}"], Path(tmp) / str(i + 1))
                   for i, (name, seed) in enumerate(jobs[1:])]
        results = [first] + [f.result() for f in futures]
    wall = time.perf_counter() - start
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for (name, _), metrics in zip(jobs, results):
        runs[name].append({k: metrics[k] for k in (*KEYS, *REFS)})
    refs = {k: results[0][k] for k in REFS}
    steps_per_epoch = 3 if args.tiny else 100

    def mean(name, key):
        return statistics.fmean(r[key] for r in runs[name])

    def sd(name, key):
        values = [r[key] for r in runs[name]]
        return statistics.stdev(values) if len(values) > 1 else 0.0
    base = next(iter(arms))
    rows, figures = [], {"seconds": seconds, "seeds": seeds, "threads": threads, "procs": args.procs,
                         "wall_s": wall, "references": refs, "arms": {}}
    for name in arms:
        delta = mean(name, "ssim_nn_train_mean") - mean(base, "ssim_nn_train_mean")
        rows.append([name, mean(name, "epoch") * steps_per_epoch, f"{mean(name, 'ssim_nn_train_mean'):.3f} ± "
                     f"{sd(name, 'ssim_nn_train_mean'):.3f}", f"{delta:+.3f}", f"{mean(name, 'diversity'):.3f}",
                     f"{mean(name, 'evaluator_acc'):.3f}", f"{int(sum(r['collapsed'] for r in runs[name]))}/{len(runs[name])}",
                     f"{mean(name, 'train_top10'):.3f} / {mean(name, 'heldout_top10'):.3f}"])
        figures["arms"][name] = {"overrides": arms[name], "runs": runs[name], "delta_ssim_vs_baseline": delta}
    if args.figure:
        frontier(runs, refs, args.figure)
        figures["figure"] = str(args.figure)
    report(f"Generator levers at equal wall time ({seconds:g} s of training, {seeds} seeds, {args.procs} at once "
           f"with {threads} threads each)",
           ["arm", "steps", "nn-SSIM (mean ± sd)", "Δ vs baseline", "diversity", "evaluator_acc", "collapsed",
            "top10 train / held-out"], rows,
           [f"reference points: held-out real {refs['ref_heldout_ssim']:.3f}, class mean "
            f"{refs['ref_classmean_ssim']:.3f}, all-black {refs['ref_blank_ssim']:.3f}, held-out diversity "
            f"{refs['ref_heldout_diversity']:.3f}; wall time {wall:.0f} s"], figures, args.json)


def frontier(runs: dict[str, list[dict]], refs: dict, path: Path, extra: list[tuple[str, float, float]] = ()) -> None:
    """nn-SSIM against diversity: each arm's mean (large marker) and its runs (small, an x over a
    collapsed one), any `extra` configurations (label, diversity, nn-SSIM), the reference points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    for i, (name, rs) in enumerate(runs.items()):
        color, marker = f"C{i % 10}", "os^vDPhX8"[i % 9]
        xs, ys = [r["diversity"] for r in rs], [r["ssim_nn_train_mean"] for r in rs]
        ax.scatter(xs, ys, color=color, marker=marker, s=18, alpha=0.45)
        ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], color=color, marker=marker, s=80,
                   edgecolors="k", label=f"{name} (mean of {len(rs)})")
        bad = [(x, y) for x, y, r in zip(xs, ys, rs) if r["collapsed"]]
        if bad:
            ax.scatter(*zip(*bad), color="k", marker="x", s=30)
    for j, (label, x, y) in enumerate(extra):
        ax.scatter([x], [y], marker="*", s=160, color=f"C{(len(runs) + j) % 10}", edgecolors="k", label=label)
    ax.scatter([], [], color="k", marker="x", s=30, label="x: a collapsed run")
    ax.axhline(refs["ref_classmean_ssim"], color="C3", ls="--", lw=1, label="class-mean image")
    ax.axhline(refs["ref_blank_ssim"], color="k", ls=":", lw=1, label="all-black image")
    ax.axhline(refs["ref_heldout_ssim"], color="C2", ls="-.", lw=1, label="held-out real images")
    ax.axvline(refs["ref_heldout_diversity"] / 2, color="grey", ls=":", lw=0.8, label="half the held-out diversity")
    ax.set_xlabel("diversity (mean 1 − SSIM, same-class pairs)")
    ax.set_ylabel("ssim_nn_train_mean")
    ax.set_title("Generator inversions of the default classifier")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(json_path: Path, figure: Path, extra: list[str]) -> None:
    """Redraw the frontier from a saved JSON, with extra points given as label:diversity:nn-SSIM."""
    data = json.loads(json_path.read_text())
    points = []
    for item in extra:
        label, x, y = item.rsplit(":", 2)
        points.append((label, float(x), float(y)))
    frontier({k: v["runs"] for k, v in data["arms"].items()}, data["references"], figure, points)


if __name__ == "__main__":
    main()
