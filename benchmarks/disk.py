"""Disk per trial at sweep scale: what DIR/ray and DIR/mlartifacts hold per trial once a sweep has ended.

One sweep, the shipped smoke file at 100 trials, the same as
    harness sweep search_spaces/smoke.yaml --set budget.num_samples=100 --set base.train.epochs=2 \\
        --set base.train.steps_per_epoch=4 --set asha.grace_period=1
measured two ways in the same run:
- after: what the folder holds (a trial's checkpoints are removed once it has ended, its artifacts are
  in MLflow and Tune's saved state records its end; the best trial's weights go to its MLflow run);
- before: what the rule before it left: every ended trial kept the last of its checkpoint folders
  (resumable state with the optimiser's, the inverter's weights, the images and samples MLflow also
  holds). Each checkpoint folder's size is taken as the sweep removes it, so the reference is the same
  trials' own checkpoints: before = after + each trial's last removed checkpoint - the weights now in MLflow.
Also the peak of DIR/ray while the sweep ran (sampled every second).

    python benchmarks/disk.py [--trials 100] [--epochs 2] [--steps 4] [--grace 1] [--out DIR]
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, parser, report

MB = 1e6


def folder_bytes(path: Path) -> int:
    """Bytes of the file `path`, or of the files under it (a file hard-linked twice counts once)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed while we looked
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class PeakFolder:
    """The largest size `path` reached, sampled every `every` seconds in a thread."""

    def __init__(self, path: Path, every: float = 1.0):
        self.path, self.every, self.peak = path, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if self.path.exists():
                self.peak = max(self.peak, folder_bytes(self.path))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, folder_bytes(self.path) if self.path.exists() else 0)


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--grace", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="sweep folder (default: a temporary one, removed)")
    p.add_argument("--address", default=None, help="run on this Ray cluster (default: a local Ray)")
    args = p.parse_args(argv)
    overrides = [f"budget.num_samples={args.trials}", f"base.train.epochs={args.epochs}",
                 f"base.train.steps_per_epoch={args.steps}", f"asha.grace_period={args.grace}"]
    if args.tiny:  # 3 trials, all at once on the tests' 4-CPU Ray head; the tests' tiny classifier
        args.trials = 3
        overrides = ["budget.num_samples=3", "base.train.epochs=2", "base.train.steps_per_epoch=2",
                     "asha.grace_period=1", "base.classifier.epochs=2", "base.evaluator.epochs=1"]

    import harness.sweep.storage as storage
    from harness.sweep.files import load_sweep
    from harness.sweep.tracking import client_for
    from harness.sweep.tune import init_ray, run_sweep

    removed: dict[Path, dict[str, int]] = {}  # trial folder -> checkpoint name -> bytes, as the sweep removes them
    remove = storage.remove_checkpoint

    def measured_remove(path: Path) -> None:
        removed.setdefault(Path(path).parent, {})[Path(path).name] = folder_bytes(path)
        remove(path)
    storage.remove_checkpoint = measured_remove

    sweep = load_sweep(REPO / "search_spaces" / "smoke.yaml", overrides)
    init_ray(args.address)
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp) / "disk").resolve()
        start = time.perf_counter()
        with PeakFolder(out / "ray") as peak:
            outcomes = run_sweep(sweep, out, address=args.address)
        wall = time.perf_counter() - start
        rows_out = [r for o in outcomes for r in o.rows]
        trials = len(rows_out)
        counts = {k: sum(r["outcome"] == k for r in rows_out) for k in sorted({r["outcome"] for r in rows_out})}
        ray_after = folder_bytes(out / "ray")
        ml_after = folder_bytes(out / "mlartifacts")
        # the rule before: each trial folder kept its lexically last checkpoint folder
        old_kept = sum(sizes[max(sizes)] for folder, sizes in removed.items() if not list(folder.glob("checkpoint_*")))
        client = client_for(f"sqlite:///{out / 'mlflow.db'}")
        weights = [(r["run_id"], a.file_size or 0) for r in rows_out if r["run_id"]
                   for a in client.list_artifacts(r["run_id"]) if a.path == storage.WEIGHTS]
        weights_bytes = sum(size for _, size in weights)
        ray_before, ml_before = ray_after + old_kept, ml_after - weights_bytes
        biggest = {}
        for sizes in removed.values():
            for name, size in sizes.items():
                biggest[name] = max(biggest.get(name, 0), size)
        checkpoints_written = sum(len(s) for s in removed.values())
        other = {name: folder_bytes(out / name) for name in ("mlflow.db", "optuna.db") if (out / name).exists()}
    import ray
    ray.shutdown()

    per = lambda b: b / MB / max(trials, 1)  # noqa: E731
    figures = {
        "trials": trials, "outcomes": counts, "wall_s": wall, "command": "harness sweep search_spaces/smoke.yaml "
        + " ".join(f"--set {o}" for o in overrides),
        "before": {"ray_mb": ray_before / MB, "mlartifacts_mb": ml_before / MB,
                   "ray_mb_per_trial": per(ray_before), "mlartifacts_mb_per_trial": per(ml_before),
                   "total_mb_per_trial": per(ray_before + ml_before)},
        "after": {"ray_mb": ray_after / MB, "mlartifacts_mb": ml_after / MB,
                  "ray_mb_per_trial": per(ray_after), "mlartifacts_mb_per_trial": per(ml_after),
                  "total_mb_per_trial": per(ray_after + ml_after), "ray_peak_mb": peak.peak / MB,
                  "runs_with_weights": len(weights), "weights_mb": weights_bytes / MB},
        "checkpoints_removed": checkpoints_written, "largest_removed_checkpoint_mb": max(biggest.values(), default=0) / MB,
        "other_mb": {k: v / MB for k, v in other.items()},
        "goal_mb_per_trial": 1.0, "met": per(ray_after + ml_after) <= 1.0,
    }
    rows = [["before: each ended trial keeps its last checkpoint", ray_before / MB, ml_before / MB,
             per(ray_before), per(ml_before), per(ray_before + ml_before), "-"],
            ["after: checkpoints only while resumable, best weights in MLflow", ray_after / MB, ml_after / MB,
             per(ray_after), per(ml_after), per(ray_after + ml_after), peak.peak / MB]]
    report(f"Disk per trial: {trials} trials of the smoke sweep ({', '.join(f'{n} {k}' for k, n in counts.items())}), "
           f"{wall:.0f} s",
           ["rule", "ray/ MB", "mlartifacts/ MB", "ray/ MB per trial", "mlartifacts/ MB per trial",
            "MB per trial", "peak ray/ MB while running"], rows,
           [f"command: {figures['command']}",
            f"before = after + the last checkpoint folder of every trial as the sweep removed it ({checkpoints_written} "
            f"checkpoint folders removed, the largest {figures['largest_removed_checkpoint_mb']:.2f} MB) - the weights "
            f"now logged to MLflow ({len(weights)} run(s), {weights_bytes / MB:.2f} MB). Not counted (the same "
            "either way): " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in other.items()) + "."],
           figures, args.json)


if __name__ == "__main__":
    main()
