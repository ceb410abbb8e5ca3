"""Benchmark: a whole CNN control run at n = 20, before and now, and with three times the
reconstruction steps (issue 30, item 3).

The run is `harness run`'s, in this process: `Trial(cfg)` (data, the evaluator, the classifier from
the cache or trained, the reference points), then `Trial.step()` epoch by epoch with its scheduled
evaluations. The configuration is search_spaces/trials/cnn_control_n20.yaml: the 1-block average-
pooling bias-free ReLU CNN at n = 20 (3,000 full-batch classifier steps), 40 candidates inverted by
direct KKT reconstruction (1,000 steps), the settings of pooling_paired's avg arm. Three arms, one
after another on one thread, in one process:

  before:     1,000 steps with the KKT residual by `kkt_residual_hooked` (the step before the
              hand-written backward pass), patched in as the name harness/science/losses.py calls;
  now:        1,000 steps as the harness runs them (`kkt_residual`);
  now_long:   `--long-steps` (3,000) steps as the harness runs them: does the longer budget sharpen
              the reconstructions?

The classifier is trained once, in the first arm (its time is in `setup_seconds` there: its cache
entry is cold, in a temporary folder where the harness's other cache entries, such as the
evaluator, are linked); the other arms load it, so their `setup_seconds` is the rest of a run's
set-up. A whole run's time as `harness run` spends it is the cold set-up + the reconstruction
+ the evaluations; the table gives each part. before and now start from the same candidates and
differ in the residual's code path only (the same values to 3e-7), so their scores should agree.
The set-up is measured once, in the before arm, and counted in every arm's whole run: the
classifier's stationarity diagnostic in it calls harness.science.kkt's residual directly, the
current one in every arm, so the whole-run ratio is that of the reconstruction alone. The arms run
once each, in this order (not alternated): the figures are for an idle machine.

    python benchmarks/control_run.py [--steps 1000] [--long-steps 3000] [--threads 1]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import REPO, parser, report
from generator_step import arm_residual  # before: losses.kkt_residual replaced by kkt_residual_hooked

CONFIG = REPO / "search_spaces" / "trials" / "cnn_control_n20.yaml"
TINY = ["data.train_size=10", "classifier.steps=40", "classifier.warmup_steps=5", "classifier.channels=[8]",
        "evaluator.epochs=1", "train.eval_every=1", "eval.reference_per_class=5"]
SCORES = ("coverage_gap", "train_coverage", "train_coverage_strict", "heldout_coverage", "train_top10",
          "ssim_nn_train_side_mean", "ref_blank_ssim")


def run_arm(arm: str, steps: int, per_epoch: int, extra: list[str], device: str) -> dict:
    from harness.config import build_config, load_yaml
    from harness.trial import Trial

    cfg = build_config(load_yaml(CONFIG), [*extra, f"train.steps_per_epoch={per_epoch}",
                                     f"train.epochs={max(1, steps // per_epoch)}", f"device={device}"])
    from harness.science import losses

    start = time.perf_counter()
    with arm_residual(arm):
        residual = losses.kkt_residual.__name__  # what the reconstruction's KKT term calls in this arm
        trial = Trial(cfg)
        trajectory = []
        while not trial.done:
            row = trial.step()
            if row["evaluated"]:
                trajectory.append({"step": trial.epoch * per_epoch, **{k: row[k] for k in SCORES if k in row}})
    wall = time.perf_counter() - start
    final = trial.history[-1]
    return {"arm": arm, "residual": residual, "steps": trial.epoch * per_epoch, "setup_seconds": trial.setup_seconds,
            "train_seconds": trial.train_seconds, "ms_per_step": 1e3 * trial.train_seconds / (trial.epoch * per_epoch),
            # the evaluations, with the inverter's and the loss terms' construction (well under a second)
            "wall_seconds": wall, "evaluation_seconds": wall - trial.setup_seconds - trial.train_seconds,
            "classifier_cache_hit": float(trial.classifier_info["cache_hit"]),
            "final": {k: final[k] for k in SCORES if k in final}, "trajectory": trajectory}


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="reconstruction steps of the before and now arms")
    p.add_argument("--long-steps", type=int, default=3000, help="reconstruction steps of the now_long arm")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import os

    import torch

    torch.set_num_threads(args.threads)
    extra = [f"threads={args.threads}", *(TINY if args.tiny else [])]
    steps, long_steps, per_epoch = (4, 8, 4) if args.tiny else (args.steps, args.long_steps, 250)
    from harness.cache import cache_dir

    with tempfile.TemporaryDirectory(prefix="control_run_cache_") as cache:
        # the classifier cold for the first arm and warm after; every other entry (the evaluator, the
        # reference points) linked from the cache the harness uses, as a user's second run finds them
        for entry in cache_dir(None).glob("*.pt"):
            if not entry.name.startswith("classifier-"):
                (Path(cache) / entry.name).symlink_to(entry)
        previous = os.environ.get("HARNESS_CACHE_DIR")
        os.environ["HARNESS_CACHE_DIR"] = cache
        try:
            arms = [run_arm("before", steps, per_epoch, extra, args.device),
                    run_arm("now", steps, per_epoch, extra, args.device),
                    run_arm("now", long_steps, per_epoch, extra, args.device)]
        finally:
            if previous is None:
                os.environ.pop("HARNESS_CACHE_DIR", None)
            else:
                os.environ["HARNESS_CACHE_DIR"] = previous
    arms[2]["arm"] = "now_long"
    cold = arms[0]["setup_seconds"]
    warm = min(a["setup_seconds"] for a in arms[1:])
    rows, figures = [], {"threads": args.threads, "config": str(CONFIG.relative_to(REPO)), "arms": arms,
                         "classifier_and_setup_seconds_cold": cold, "setup_seconds_warm": warm}
    for a in arms:
        # a run as `harness run` spends it from a cold cache: the classifier trained, then this arm
        whole = cold + a["train_seconds"] + a["evaluation_seconds"]
        a["whole_run_seconds_cold_cache"] = whole
        f = a["final"]
        rows.append([a["arm"], a["steps"], a["ms_per_step"], a["train_seconds"], a["evaluation_seconds"], whole,
                     f.get("coverage_gap"), f.get("train_coverage_strict"), f.get("train_top10"),
                     f.get("heldout_coverage")])
    figures["speedup_step"] = arms[0]["ms_per_step"] / arms[1]["ms_per_step"]
    figures["speedup_whole_run"] = arms[0]["whole_run_seconds_cold_cache"] / arms[1]["whole_run_seconds_cold_cache"]
    notes = [f"Set-up with the classifier not cached (data, evaluator, the classifier's {'40' if args.tiny else '3,000'} "
             f"full-batch steps, reference points): {cold:.1f} s; with the classifier cached: {warm:.1f} s.",
             f"Reconstruction step now vs before: {figures['speedup_step']:.2f}x; a whole run from a cold cache: "
             f"{figures['speedup_whole_run']:.2f}x.",
             "Trajectory of now_long (step: coverage_gap, strict coverage, top-10 best SSIM): " + "; ".join(
                 f"{t['step']}: {t.get('coverage_gap', float('nan')):.3f}, {t.get('train_coverage_strict', float('nan')):.3f}, "
                 f"{t.get('train_top10', float('nan')):.3f}" for t in arms[2]["trajectory"])]
    report("A CNN control run at n = 20: before, now, and with more reconstruction steps",
           ["arm", "steps", "ms a step", "reconstruction s", "evaluation s", "whole run s (cold cache)",
            "coverage_gap", "strict coverage", "top-10 SSIM", "held-out coverage"],
           rows, notes, figures, args.json)


if __name__ == "__main__":
    main()
