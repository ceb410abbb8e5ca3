"""The GPU pass (run by benchmarks/gpu_check.sh): on a machine with a CUDA device, within 8 minutes,
run each check below with its own time limit, then write ONE JSON of figures.

  tests             the tests whose code runs on the trial's device (device: auto -> cuda)
  shared_gpu        benchmarks/sweep_overhead.py: 8 trials one at a time in one process against
                    `harness sweep` with 4 concurrent trials sharing the GPU (1/4 each); the
                    throughput ratio (target >= 3x) and the peak RSS of a Ray trial worker
                    (target < 1.5 GB)
  step_fp32 / step_amp / step_compile
                    benchmarks/step.py, the CE-only generator step on the GPU: as is, with
                    train.amp=true and with train.compile=true (ms per step after warm-up; the
                    command's wall time includes the compilation)
  positive_control  `harness run` of search_spaces/trials/positive_control.yaml: wall time and
                    final metrics
  pretrain          benchmarks/pretrain.py on the GPU: the DataLoader reference, both memory
                    layouts, the gd path of the positive control's classifier
  long_reconstruction  (only with --long) `harness run` of
                    search_spaces/trials/positive_control_n500_long.yaml: the MLP positive control at
                    n = 500 with 50,000 reconstruction steps (Haim et al. 2022's budget); wall time,
                    steps done, ms per step, coverage_gap, train/heldout coverage, the KKT residual.
                    It does not fit in the 8 minutes, so it is opt-in, runs after the other checks
                    with its own limit (LONG_S, 15 minutes; the shell script's limit grows by as
                    much), and stops training at LONG_S - LONG_SETUP_S seconds (train.max_seconds)
                    so that it always evaluates and writes its figures, with the steps it reached.

Each check gets at most its own limit and never more than what is left of the total (the long
stage: its own limit alone); a check that fails or runs out of time is recorded as such and the pass
goes on. Every check uses a fresh classifier cache, so classifiers are trained on the GPU within the
pass.

    benchmarks/gpu_check.sh [--out DIR] [--dry-run] [--long] [--only NAME,...]

--dry-run needs no GPU: it checks that every command the pass would run parses (the benchmarks'
--check-args, pytest's collection, the positive control's configuration) and writes the JSON with
no figures in it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
POSITIVE_CONTROL = REPO / "search_spaces" / "trials" / "positive_control.yaml"
LONG_CONFIG = REPO / "search_spaces" / "trials" / "positive_control_n500_long.yaml"
TOTAL_S = 460  # the shell script kills the pass at 480 s; this leaves time to write the JSON
LONG_S = 900  # --long: the long reconstruction's own limit (gpu_check.sh adds it to its 480 s)
LONG_SETUP_S = 300  # of which classifier, evaluator and reference points, evaluations and outputs
LONG_STEPS = 50_000
TEST_FILES = ["tests/test_trial.py", "tests/test_leakage.py"]
SHARED_GPU_TARGET = 3.0  # 4 trials sharing one GPU against one at a time: throughput ratio
RSS_TARGET_BYTES = 1.5e9  # peak RSS of a Ray trial worker


@dataclass
class Check:
    name: str
    argv: list[str]
    limit_s: int
    dry_argv: list[str] | None = None  # what --dry-run runs instead (None: nothing)
    output: str | None = None  # the JSON the check writes, relative to the work folder
    result: dict = field(default_factory=dict)
    own_limit: bool = False  # limited by limit_s alone, not by what is left of the pass's TOTAL_S


def plan(work: Path, long: bool = False) -> list[Check]:
    py = sys.executable

    def bench(name: str, json_name: str, *args: str) -> tuple[list[str], list[str]]:
        argv = [py, str(BENCH / f"{name}.py"), "--json", str(work / json_name), *args]
        return argv, argv + ["--check-args"]

    checks = []
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES, f"--junitxml={work / 'tests.xml'}"]
    checks.append(Check("tests", tests, 110, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                                              *TEST_FILES], "tests.xml"))
    argv, dry = bench("sweep_overhead", "shared_gpu.json", "--concurrency", "4", "--cpus-per-trial", "2",
                      "--trials", "8", "--epochs", "2", "--steps", "50")
    checks.append(Check("shared_gpu", argv, 130, dry, "shared_gpu.json"))
    for name, extra, limit in (("step_fp32", [], 30), ("step_amp", ["--set", "train.amp=true"], 30),
                               ("step_compile", ["--set", "train.compile=true"], 80)):
        argv, dry = bench("step", f"{name}.json", "--device", "cuda", "--terms=", "--no-direct", "--steps", "50",
                          *extra)
        checks.append(Check(name, argv, limit, dry, f"{name}.json"))
    pc = ["--config", str(POSITIVE_CONTROL), "--out", str(work / "positive_control"), "--quiet", "--set", "device=cuda"]
    checks.append(Check("positive_control", [py, "-m", "harness.cli", "run", *pc], 130,
                        [py, str(Path(__file__)), "--validate-config", *pc[:2], *pc[-2:]],
                        "positive_control/metrics.json"))
    argv, dry = bench("pretrain", "pretrain.json", "--device", "cuda", "--epochs", "1", "--train-images", "30000",
                      "--rounds", "2", "--gd-steps", "3000")
    checks.append(Check("pretrain", argv, 60, dry, "pretrain.json"))
    if long:
        lc = ["--config", str(LONG_CONFIG), "--out", str(work / "long_reconstruction"), "--quiet",
              "--set", "device=cuda", "--set", f"train.max_seconds={LONG_S - LONG_SETUP_S}"]
        checks.append(Check("long_reconstruction", [py, "-m", "harness.cli", "run", *lc], LONG_S,
                            [py, str(Path(__file__)), "--validate-config", *lc[:2], *lc[-4:]],
                            "long_reconstruction/metrics.json", own_limit=True))
    return checks


def run_checks(checks: list[Check], work: Path, env: dict, dry_run: bool) -> None:
    deadline = time.monotonic() + TOTAL_S
    for check in checks:
        argv = check.dry_argv if dry_run else check.argv
        left = int(deadline - time.monotonic())
        if argv is None:
            check.result = {"skipped": "nothing to check in a dry run"}
            continue
        if left < 10 and not check.own_limit:
            check.result = {"skipped": f"out of time ({TOTAL_S} s for the pass)"}
            continue
        limit = check.limit_s if check.own_limit else min(check.limit_s, left)
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired as exc:
            text = exc.stdout or ""
            rc, tail = 124, (text.decode(errors="replace") if isinstance(text, bytes) else text)[-1500:]
        check.result = {"command": shlex.join(argv), "rc": rc, "seconds": round(time.monotonic() - start, 1),
                        "limit_s": limit, "timed_out": rc == 124}
        if rc != 0:
            check.result["output_tail"] = tail
        print(f"gpu_check: {check.name}: rc {rc} in {check.result['seconds']} s", flush=True)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = float(suite.get("time", 0))
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def pick(d: dict | None, *keys: str) -> dict:
    return {k: d[k] for k in keys if d and k in d}


def figures(checks: dict[str, Check], work: Path) -> dict:
    """The figures of every check that wrote its output; None where it did not."""
    out = {"tests": junit_counts(work / "tests.xml")}
    shared = read_json(work / "shared_gpu.json")
    out["shared_gpu"] = shared and {
        **pick(shared, "throughput_b_vs_a", "gpu_per_trial", "trials", "epochs", "steps", "time_a_s", "time_b_s",
               "overhead_ratio", "finished_b", "peak_rss_ray_worker_mb", "peak_rss_in_process_trials_mb"),
        "target": SHARED_GPU_TARGET, "met": shared.get("throughput_b_vs_a", 0) >= SHARED_GPU_TARGET,
        "ray_worker_rss_gb": shared.get("peak_rss_ray_worker_mb", 0) * 2 ** 20 / 1e9,
        "ray_worker_rss_met": shared.get("peak_rss_ray_worker_mb", float("inf")) * 2 ** 20 < RSS_TARGET_BYTES}
    steps = {}
    for name in ("step_fp32", "step_amp", "step_compile"):
        data = read_json(work / f"{name}.json")
        if data:
            steps[name] = {"ms_per_step": data["per_term"]["ce"]["ms_per_step"],
                           "command_seconds": checks[name].result.get("seconds")}
    base = steps.get("step_fp32", {}).get("ms_per_step")
    for name in ("step_amp", "step_compile"):
        if base and name in steps:
            steps[name]["speedup_vs_fp32"] = base / steps[name]["ms_per_step"]
    out["generator_step"] = steps or None
    metrics = read_json(work / "positive_control" / "metrics.json")
    out["positive_control"] = metrics and {"wall_s": checks["positive_control"].result.get("seconds"),
                                           **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    pretrain = read_json(work / "pretrain.json")
    out["pretrain"] = pretrain and {
        **{arm: pretrain[arm] for arm in ("reference", "harness_contiguous", "harness_channels_last") if arm in pretrain},
        **pick(pretrain, "speedup", "channels_last_speedup", "gradient_error_vs_float64", "matmul_gflops", "gd")}
    out["long_reconstruction"] = long_figures(checks, work) if "long_reconstruction" in checks else None
    return out


def long_figures(checks: dict[str, Check], work: Path) -> dict | None:
    """The long reconstruction's figures: wall time, steps reached, ms per step, leakage, KKT residual."""
    metrics = read_json(work / "long_reconstruction" / "metrics.json")
    if not metrics:
        return None
    import yaml

    per_epoch = yaml.safe_load(LONG_CONFIG.read_text())["train"]["steps_per_epoch"]
    steps = int(metrics.get("epoch", 0)) * per_epoch
    train_s = metrics.get("train_seconds")
    return {"wall_s": checks["long_reconstruction"].result.get("seconds"), "steps_done": steps,
            "steps_target": LONG_STEPS, "reached": steps >= LONG_STEPS, "train_seconds": train_s,
            "ms_per_step": train_s * 1e3 / steps if steps and train_s else None,
            **pick(metrics, "coverage_gap", "coverage_gap_strict", "train_coverage", "heldout_coverage",
                   "train_coverage_strict", "heldout_coverage_strict", "top10_gap", "ssim_nn_train_mean",
                   "kkt_residual_bank", "kkt_residual_train", "kkt_residual_heldout", "classifier_train_acc",
                   "classifier_test_acc", "diversity", "evaluator_acc")}


def validate_config(argv: list[str]) -> None:
    """--dry-run's check of `harness run --config FILE --set K=V ...`: the configuration builds."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from harness.config import build_config, load_yaml

    build_config(load_yaml(args.config), args.set)
    print("configuration ok")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--validate-config"]:
        validate_config(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="folder for gpu_check.json (default: $OUT if set, else benchmarks/results)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: check every command parses, write the JSON")
    p.add_argument("--work", type=Path, default=None, help="keep the checks' own outputs in this folder")
    p.add_argument("--long", action="store_true",
                   help=f"add the long reconstruction (n = 500, {LONG_STEPS:,} steps; its own {LONG_S} s limit)")
    p.add_argument("--only", default=None, help="run only these checks (comma-separated names)")
    args = p.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or BENCH / "results")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU, "
              "or pass --dry-run to check the script", file=sys.stderr)
        return 2

    started = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    shared = REPO.parent / "shared" / "datasets"
    if "HARNESS_DATA_ROOT" not in env and shared.is_dir():
        env["HARNESS_DATA_ROOT"] = str(shared)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env["HARNESS_CACHE_DIR"] = str(work / "cache")  # classifiers trained within the pass, on the GPU
        checks = plan(work, long=args.long)
        if args.only:
            names = set(args.only.split(","))
            unknown = names - {c.name for c in checks}
            if unknown:
                p.error(f"--only: no check named {', '.join(sorted(unknown))}" + ("" if args.long else
                        " (long_reconstruction needs --long)"))
            checks = [c for c in checks if c.name in names]
        run_checks(checks, work, env, args.dry_run)
        by_name = {c.name: c for c in checks}
        result = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name(0) if cuda else None,
                  "torch": torch.__version__, "cpus": os.cpu_count(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                  "seconds": round(time.time() - started, 1),
                  "checks": {c.name: c.result for c in checks},
                  "figures": figures(by_name, work)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    failed = [c.name for c in checks if c.result.get("rc", 0) != 0]
    print(f"gpu_check: wrote {path}" + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
