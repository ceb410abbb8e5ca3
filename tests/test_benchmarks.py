"""Every benchmark runs at a tiny size, prints its table and writes its figures (so none rots).
No timing is asserted: the figures are checked for being measured, not for being fast.

The benchmark runs (`bench`) are left out of the default run, which they would lengthen by about
a third (each starts its own processes, three of them Ray sweeps): `python -m pytest -q -m bench`
runs them, and should after any change to benchmarks/ or to what they call. The checks here that
run no benchmark script (known answers, one-line errors) stay in the default run."""
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


@pytest.mark.bench
def test_pretrain_benchmark(tmp_path):
    fig = bench("pretrain", tmp_path)
    for arm in ("reference", "harness", "harness_contiguous", "harness_channels_last"):
        assert fig[arm]["samples_per_s"] > 0 and 0.3 < fig[arm]["test_acc"] <= 1.0
    assert fig["harness"]["layout"] == "contiguous"  # fit's default
    assert fig["speedup"] > 0 and fig["channels_last_speedup"] > 0 and fig["matmul_gflops"] > 0
    assert len(fig["channels_last_interleaved"]) == 2 and fig["channels_last_interleaved_median"] > 0
    assert fig["step_gflop"] == pytest.approx(2.74, rel=0.05)  # the 2-block CNN at batch 100, fwd + bwd
    # the default path's gradients are float32-exact; channels_last's are measured, whatever they are
    assert fig["gradient_error_vs_float64"]["contiguous"] < 1e-3
    assert fig["gradient_error_vs_float64"]["channels_last"] >= 0
    gd = fig["gd"]
    assert gd["steps"] == 20 and gd["seconds"] > 0 and gd["step_gflop"] > 0 and 0 <= gd["train_acc"] <= 1
    assert len(gd["fused_vs_multipass"]) == 2 and gd["max_weight_diff_fused"] < 1e-5  # the same weights


def test_channels_last_pretraining_returns_a_model_in_the_default_layout():
    import torch

    from harness.science.classifiers import ShallowCNN, fit
    from harness.science.data import Split

    torch.manual_seed(0)
    data = Split(torch.rand(40, 1, 28, 28) * 2 - 1, torch.arange(40) % 10)
    model = fit(ShallowCNN(2, "avg"), data, 1, 20, 1e-3, 0.0, 0, torch.device("cpu"), channels_last=True)
    assert all(t.is_contiguous() for t in model.state_dict().values())  # what the cache stores
    assert not model.training


@pytest.mark.bench
def test_step_benchmark(tmp_path):
    fig = bench("step", tmp_path, "--terms", "tv,kkt")
    assert set(fig["per_term"]) == {"ce", "tv", "kkt"}
    assert fig["per_term"]["ce"]["vs_ce"] == 1.0
    assert fig["ce_step_gflop"] > 0 and 0 < fig["matmul_share"]
    direct = fig["direct_kkt"]
    assert direct["candidates"] == 200 and direct["ms_per_candidate"] > 0 and direct["step_gflop"] > 0


@pytest.mark.bench
def test_metrics_benchmark(tmp_path):
    fig = bench("metrics", tmp_path)
    assert fig["exact_matches"] == fig["checked"]  # the prefilter finds the brute-force maximum
    assert fig["brute_extrapolated_s"] > 0 and fig["evaluation_s"] > 0


@pytest.mark.bench
def test_threads_benchmark(tmp_path):
    fig = bench("threads", tmp_path, "--cores", "2")
    assert fig["arms"]["disciplined"]["threads"] == 1 and fig["arms"]["oversubscribed"]["threads"] == 2
    assert all(len(a["ms_per_step"]) == a["procs"] for a in fig["arms"].values())


@pytest.mark.bench
@pytest.mark.sweep
def test_sweep_overhead_benchmark(tmp_path, ray_address):
    fig = bench("sweep_overhead", tmp_path, "--address", ray_address)
    assert fig["finished_b"] == fig["trials"] == 2
    assert fig["overhead_ratio"] > 0 and fig["peak_rss_in_process_trials_mb"] > 100
    assert fig["peak_rss_ray_worker_mb"] > 100  # the sampler saw the Ray workers


@pytest.mark.bench
@pytest.mark.sweep
def test_asha_benchmark(tmp_path, ray_address):
    fig = bench("asha", tmp_path, "--address", ray_address)
    arms = fig["arms"]
    full = arms["full budget (no ASHA, no stopper)"]
    assert full["trial_epochs"] == fig["trials"] * fig["epochs"]
    # the same weights in every arm: the comparison is of the scheduler alone
    configs = [sorted(json.dumps(c, sort_keys=True) for c in a["configs"]) for a in arms.values()]
    assert len(configs) == 2 and configs[0] == configs[1]  # --tiny: full budget and the default
    assert all(a["trial_epochs"] <= full["trial_epochs"] for a in arms.values())
    assert all(a["peak_rss_ray_worker_mb"] > 100 for a in arms.values())  # the sampler saw the Ray workers


@pytest.mark.bench
@pytest.mark.sweep
def test_disk_benchmark(tmp_path, ray_address):
    fig = bench("disk", tmp_path, "--address", ray_address)
    before, after = fig["before"], fig["after"]
    assert fig["trials"] == 3 and fig["checkpoints_removed"] >= fig["trials"]  # every trial's checkpoints went
    assert after["runs_with_weights"] == 1 and after["weights_mb"] > 0  # the best trial's, in MLflow
    assert 0 < after["ray_mb_per_trial"] < before["ray_mb_per_trial"]
    assert after["ray_peak_mb"] >= after["ray_mb"]


@pytest.mark.bench
def test_memory_benchmark(tmp_path):
    # the sweep half is the smoke sweep plus the sampler that test_sweep_overhead_benchmark runs
    fig = bench("memory", tmp_path, "--no-sweep")
    assert fig["one trial, tiny"]["peak_rss_mb"] > 100


@pytest.mark.bench
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


@pytest.mark.bench
def test_gpu_check_dry_run_parses_every_command(tmp_path):
    # no GPU needed: each benchmark parses its arguments (--check-args), pytest collects the tests,
    # the positive control's configuration builds; the JSON is written with no figures. --long adds
    # the opt-in long reconstruction (its configuration builds too)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--long", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True
    checks = result["checks"]
    assert set(checks) == {"tests", "shared_gpu", "step_fp32", "step_amp", "step_compile", "positive_control",
                           "pretrain", "long_reconstruction"}
    assert all(c["rc"] == 0 for c in checks.values()), checks
    assert "--concurrency 4" in checks["shared_gpu"]["command"] and "train.amp=true" in checks["step_amp"]["command"]
    long = checks["long_reconstruction"]["command"]
    assert "positive_control_n500_long.yaml" in long and "device=cuda" in long and "train.max_seconds=" in long
    assert all(v is None for v in result["figures"].values())
    # without --long the pass is the 8-minute one; --only runs just the named checks
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only", "positive_control",
                           "--out", str(tmp_path / "plain")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert set(json.loads((tmp_path / "plain" / "gpu_check.json").read_text())["checks"]) == {"positive_control"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only",
                           "long_reconstruction", "--out", str(tmp_path / "plain")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "needs --long" in proc.stderr


def test_gpu_check_reads_the_figures_the_checks_write(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu_check  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    assert "long_reconstruction" not in {c.name for c in gpu_check.plan(tmp_path)}  # opt-in
    checks = {c.name: c for c in gpu_check.plan(tmp_path, long=True)}
    assert checks["long_reconstruction"].own_limit and checks["long_reconstruction"].limit_s == gpu_check.LONG_S
    for name, ms in (("step_fp32", 10.0), ("step_amp", 5.0), ("step_compile", 4.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"per_term": {"ce": {"ms_per_step": ms}}}))
        checks[name].result = {"rc": 0, "seconds": 20.0}
    (tmp_path / "shared_gpu.json").write_text(json.dumps({"throughput_b_vs_a": 3.2, "peak_rss_ray_worker_mb": 1400}))
    (tmp_path / "positive_control").mkdir()
    (tmp_path / "positive_control" / "metrics.json").write_text(json.dumps({"ssim_nn_train_mean": 0.4, "x": "text"}))
    checks["positive_control"].result = {"rc": 0, "seconds": 95.0}
    fig = gpu_check.figures(checks, tmp_path)
    assert fig["shared_gpu"]["met"] is True and fig["shared_gpu"]["peak_rss_ray_worker_mb"] == 1400
    assert fig["shared_gpu"]["ray_worker_rss_met"] is True  # 1,400 MiB = 1.47 GB
    assert fig["generator_step"]["step_amp"]["speedup_vs_fp32"] == 2.0
    assert fig["generator_step"]["step_compile"]["speedup_vs_fp32"] == 2.5
    assert fig["positive_control"] == {"wall_s": 95.0, "ssim_nn_train_mean": 0.4}
    assert fig["tests"] is None and fig["pretrain"] is None  # not written: recorded as missing
    assert fig["long_reconstruction"] is None
    (tmp_path / "long_reconstruction").mkdir()
    (tmp_path / "long_reconstruction" / "metrics.json").write_text(json.dumps(
        {"epoch": 50, "train_seconds": 250.0, "coverage_gap": 0.2, "train_coverage": 0.3, "heldout_coverage": 0.1,
         "kkt_residual_bank": 0.05, "note": "text"}))
    checks["long_reconstruction"].result = {"rc": 0, "seconds": 400.0}
    long = gpu_check.figures(checks, tmp_path)["long_reconstruction"]
    assert long["steps_done"] == 50_000 and long["reached"] is True and long["ms_per_step"] == pytest.approx(5.0)
    assert long["wall_s"] == 400.0 and long["coverage_gap"] == 0.2 and long["kkt_residual_bank"] == 0.05
    assert long["train_coverage"] == 0.3 and long["heldout_coverage"] == 0.1 and "note" not in long


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_a_gpu_fails_with_one_line(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.bench
def test_rescale_rules_benchmark(tmp_path):
    fig = bench("rescale_rules", tmp_path)
    (run,) = fig["runs"].values()
    assert set(run) == {"min", "0.02", "now"}
    for m in run.values():  # the known answers are in the test below, on a hand-built bank
        assert m["candidates"] == 40 and 0 <= m["at_origin"] <= 40
        assert all(0 <= m[k] <= 1 for k in ("train_coverage", "heldout_coverage"))


def test_rescale_rules_benchmark_on_a_hand_built_bank(tmp_path):
    """A run folder whose bank is built by hand, scored by the benchmark. Per class, six candidates:
    o + 0.5 (t − o) for the class's two training images t and its two held-out-side images (each
    comes back as that image under every rule: stretch 2, see `stretch_to_range`), and twice the
    origin o with its corner pixel pushed from −1 (o's value there: every MNIST image is 0 in its
    corners) to −1.5. The rule `min` (no_room 0) lets that pixel, which has no room, fix the stretch at
    0: at the origin; the other rules leave it out (stretch 1). Both give the image o. So every
    rule finds every image of both sides, and only `at_origin` tells the rules apart: 20, 0, 0."""
    import torch

    from harness.config import build_config
    from harness.trial import Trial

    cfg = build_config({"inverter": "direct", "data": {"train_size": 20},
                        "classifier": {"arch": "mlp", "widths": [64], "norm": "none", "bias": False, "dropout": 0,
                                       "center": True, "optimizer": "gd", "steps": 20},
                        "evaluator": {"epochs": 1}, "eval": {"per_class": 4, "diversity_pairs": 5},
                        "loss": {"ce": 0, "tv": 0, "bn": 0, "kkt": 1, "pixel": 1},
                        "direct": {"rescale": "range", "candidates_per_class": 6},
                        "train": {"epochs": 1, "steps_per_epoch": 3}})
    trial = Trial(cfg)
    o = trial.inverter.origin.cpu()
    assert o[0, 0, 0, 0].item() == -1.0
    train, held = trial.train_set, trial.evaluator.heldout
    assert len(train) == len(held) == 20 and not trial.evaluator.capped  # both sides: 2 images per class
    outlier = o.clone()
    outlier[0, 0, 0, 0] = -1.5
    bank = torch.cat([torch.cat([o + 0.5 * (train.images[train.labels == k] - o),
                                 o + 0.5 * (held.images[held.labels == k] - o), outlier, outlier])
                      for k in range(10)])
    assert torch.equal(trial.inverter.labels, torch.arange(10).repeat_interleave(6))
    with torch.no_grad():
        trial.inverter.images.copy_(bank)
    trial.write_outputs(tmp_path / "run")
    out = tmp_path / "rescale_rules.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rescale_rules.py"), str(tmp_path / "run"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"].values()
    assert {rule: m["at_origin"] for rule, m in run.items()} == {"min": 20, "0.02": 0, "now": 0}
    for m in run.values():
        assert m["candidates"] == 60
        assert m["train_coverage"] == m["heldout_coverage"] == 1.0
        assert m["coverage_gap"] == m["coverage_gap_strict"] == 0.0
        assert m["top10_gap"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.bench
def test_kkt_step_benchmark(tmp_path):
    fig = bench("kkt_step", tmp_path)
    assert set(fig["cases"]) == {"MLP n=10", "CNN 1-block n=5", "CNN 2-block n=5"}
    for case in fig["cases"].values():
        assert case["ms_explicit"] > 0 and case["ms_hooked"] > 0 and case["ms_now"] > 0 and case["step_gflop_now"] > 0
        # the three ways compute the same residual and gradients
        assert case["relative_gap_hooked"] < 1e-5 and case["relative_gap_now"] < 1e-5


@pytest.mark.bench
def test_generator_step_benchmark(tmp_path):
    fig = bench("generator_step", tmp_path, "--profile", "--top", "5")
    assert set(fig["cases"]) == {"MLP n=10", "CNN 1-block n=10"}
    for case in fig["cases"].values():
        assert case["bank"] == 2 * case["n"]  # the full bank of 2n codes
        assert case["ms_before"] > 0 and case["ms_now"] > 0 and case["speedup"] > 0
        assert all(v > 0 for v in case["parts"].values())
        assert len(case["profile_now"]) == 5 and case["profile_now"][0]["self_ms"] > 0
        # both arms give the same KKT term and the same gradients in the generator and the multipliers
        gap = case["relative_gap"]
        assert gap["kkt_term"] > 0 and gap["largest"] < 1e-5
        assert gap["value"] < 1e-5 and gap["generator_grad"] < 1e-5 and gap["multiplier_grad"] < 1e-5


def test_peak_memory_sees_a_child_that_holds_a_known_amount():
    """PeakMemory's known answer: a child process that writes 300 MiB and holds them. Its RSS and
    the tree's PSS (the child's pages are its own) both reach 300 MiB; a PSS read only at growth
    still finds it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from procmem import PeakMemory
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    mib = 2 ** 20
    code = "import sys, time; b = bytearray(300 * 2 ** 20); b[::4096] = b'x' * len(b[::4096]); print('held', flush=True); time.sleep(3)"
    with PeakMemory(interval=0.1, match="bytearray") as mem:  # the child alone
        before = mem.peak_total_pss  # this process's own tree, read on entering
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "held"
        child.wait(timeout=30)
    assert mem.peak_process_rss >= 300 * mib
    assert mem.peak_total_pss >= before + 0.95 * 300 * mib


@pytest.mark.bench
def test_control_run_benchmark(tmp_path):
    fig = bench("control_run", tmp_path)
    before, now, long = fig["arms"]
    assert [a["arm"] for a in fig["arms"]] == ["before", "now", "now_long"]
    # the before arm's reconstruction ran the residual before the hand-written backward pass
    assert [a["residual"] for a in fig["arms"]] == ["kkt_residual_hooked", "kkt_residual", "kkt_residual"]
    assert [a["steps"] for a in fig["arms"]] == [4, 4, 8]
    # the classifier is trained in the first arm alone (a cold cache entry), loaded by the others
    assert [a["classifier_cache_hit"] for a in fig["arms"]] == [0.0, 1.0, 1.0]
    assert fig["classifier_and_setup_seconds_cold"] == before["setup_seconds"] > fig["setup_seconds_warm"]
    for a in fig["arms"]:
        assert a["ms_per_step"] == pytest.approx(1e3 * a["train_seconds"] / a["steps"])
        assert a["whole_run_seconds_cold_cache"] == pytest.approx(
            before["setup_seconds"] + a["train_seconds"] + a["evaluation_seconds"])
        assert 0 <= a["final"]["train_top10"] <= 1 and a["final"]["heldout_coverage"] >= 0
    # eval_every 1 in the tiny run: one evaluation per epoch of 4 steps
    assert [t["step"] for t in long["trajectory"]] == [4, 8]
    assert fig["speedup_step"] == pytest.approx(before["ms_per_step"] / now["ms_per_step"])
    assert fig["speedup_whole_run"] == pytest.approx(
        before["whole_run_seconds_cold_cache"] / now["whole_run_seconds_cold_cache"])
