"""Every benchmark runs at a tiny size, prints its table and writes its figures (so none rots).
No timing is asserted: the figures are checked for being measured, not for being fast."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def bench(name: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--tiny", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| " in proc.stdout and "machine:" in proc.stdout
    return json.loads(out.read_text())


def test_pretrain_benchmark(tmp_path):
    fig = bench("pretrain", tmp_path)
    for arm in ("reference", "harness"):
        assert fig[arm]["samples_per_s"] > 0 and 0.3 < fig[arm]["test_acc"] <= 1.0
    assert fig["speedup"] > 0 and fig["matmul_gflops"] > 0
    assert fig["step_gflop"] == pytest.approx(2.74, rel=0.05)  # the 2-block CNN at batch 100, fwd + bwd


def test_step_benchmark(tmp_path):
    fig = bench("step", tmp_path, "--terms", "tv,kkt")
    assert set(fig["per_term"]) == {"ce", "tv", "kkt"}
    assert fig["per_term"]["ce"]["vs_ce"] == 1.0
    assert fig["ce_step_gflop"] > 0 and 0 < fig["matmul_share"]
    direct = fig["direct_kkt"]
    assert direct["candidates"] == 200 and direct["ms_per_candidate"] > 0 and direct["step_gflop"] > 0


def test_metrics_benchmark(tmp_path):
    fig = bench("metrics", tmp_path)
    assert fig["exact_matches"] == fig["checked"]  # the prefilter finds the brute-force maximum
    assert fig["brute_extrapolated_s"] > 0 and fig["evaluation_s"] > 0


def test_threads_benchmark(tmp_path):
    fig = bench("threads", tmp_path, "--cores", "2")
    assert fig["arms"]["disciplined"]["threads"] == 1 and fig["arms"]["oversubscribed"]["threads"] == 2
    assert all(len(a["ms_per_step"]) == a["procs"] for a in fig["arms"].values())


@pytest.mark.sweep
def test_sweep_overhead_benchmark(tmp_path, ray_address):
    fig = bench("sweep_overhead", tmp_path, "--address", ray_address)
    assert fig["finished_b"] == fig["trials"] == 2
    assert fig["overhead_ratio"] > 0 and fig["peak_rss_in_process_trials_mb"] > 100
    assert fig["peak_rss_ray_worker_mb"] > 100  # the sampler saw the Ray workers


@pytest.mark.sweep
def test_asha_benchmark(tmp_path, ray_address):
    fig = bench("asha", tmp_path, "--address", ray_address)
    arms = fig["arms"]
    full = arms["full budget (no ASHA, no stopper)"]
    assert full["trial_epochs"] == fig["trials"] * fig["epochs"]
    # the same weights in every arm: the comparison is of the scheduler alone
    configs = [sorted(json.dumps(c, sort_keys=True) for c in a["configs"]) for a in arms.values()]
    assert configs[0] == configs[1] == configs[2]
    assert all(a["trial_epochs"] <= full["trial_epochs"] for a in arms.values())


def test_memory_benchmark(tmp_path):
    # the sweep half is the smoke sweep plus the sampler that test_sweep_overhead_benchmark runs
    fig = bench("memory", tmp_path, "--no-sweep")
    assert fig["one trial, tiny"]["peak_rss_mb"] > 100


def test_levers_benchmark(tmp_path):
    fig = bench("levers", tmp_path, "--figure", str(tmp_path / "frontier.png"))
    arms = fig["arms"]
    assert len(arms) == 2 and all(len(a["runs"]) == 1 for a in arms.values())
    base = next(iter(arms.values()))
    assert base["delta_ssim_vs_baseline"] == 0.0  # the baseline against itself
    assert all(r["epoch"] >= 1 and 0 < r["ssim_nn_train_mean"] <= 1 for a in arms.values() for r in a["runs"])
    assert (tmp_path / "frontier.png").stat().st_size > 0
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "levers.py"), "--replot", str(tmp_path / "levers.json"),
                           "--figure", str(tmp_path / "again.png"), "--extra", "a longer run:0.5:0.3"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "again.png").stat().st_size > 0
