"""The Markdown sections of a report (`harness.report.sections`) on hand-made run records: every
run listed, only those that ended normally averaged. No MLflow store."""
from types import SimpleNamespace

from harness.report.sections import control_section, per_seed_section
from harness.records.results import mean_ci


def _control_run(seed: int, status="FINISHED", **metrics):
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, params={"seed": str(seed), "inverter": "direct"}),
                           info=SimpleNamespace(status=status))


def test_control_section_judges_the_claim_on_the_control_runs():
    params = {"claim.metric": "ssim_nn_train_mean", "claim.greater": "pool=avg", "claim.lesser": "pool=max",
              "claim.statement": "avg leaks more"}
    # the study's own (generator) inversions: per-seed differences 0.01, 0, -0.01 -> inconclusive
    study = {"pool=avg": [0.30, 0.31, 0.32], "pool=max": [0.29, 0.31, 0.33]}
    stats = {v: {"ssim_nn_train_mean": mean_ci(vals)} for v, vals in study.items()}
    values = {v: list(zip((1000, 1001, 1002), vals)) for v, vals in study.items()}
    # the control: avg 0.40 vs max 0.30, per-seed differences 0.10, 0.09, 0.11: the interval of the
    # difference lies above 0
    controlled = {"pool=avg": [_control_run(s, ssim_nn_train_mean=v, collapsed=c)
                               for s, v, c in zip((1000, 1001, 1002), (0.39, 0.40, 0.41), (1.0, 0.0, 0.0))]
                  # a control run that failed part-way: listed, not averaged
                  + [_control_run(1003, "FAILED", ssim_nn_train_mean=0.99, collapsed=1.0)],
                  "pool=max": [_control_run(s, ssim_nn_train_mean=v) for s, v in zip((1000, 1001, 1002), (0.29, 0.31, 0.30))]}
    refs = {v: {"ref_blank_ssim": 0.25, "ref_classmean_ssim": 0.40, "ref_heldout_ssim": 0.49} for v in controlled}
    text = "\n".join(control_section(params, stats, controlled, refs, values))
    assert "pool=avg: direct inverter, seeds 1000, 1001, 1002, 1003 (excluded from the averages: 1003 failed)" in text
    # mean 0.400, half-width t(0.975, 2) x 0.01 / sqrt(3) = 4.303 x 0.005774 = 0.0248
    assert "| pool=avg | 3 | 0.400 ± 0.025 |" in text
    header = next(line for line in text.splitlines() if line.startswith("| variant |")).split(" | ")
    avg = next(line for line in text.splitlines() if line.startswith("| pool=avg |")).split(" | ")
    assert avg[header.index("collapsed")] == "1 of 3"  # one of the three control runs collapsed
    # three pairs: the interval lies above 0 but the sign-flip p cannot go below 2/8, so the control's
    # verdict is inconclusive too, and the reading says the two agree
    assert "The claim on the control: **inconclusive**" in text
    assert "paired by seed over 3 seeds both ran: mean 0.100" in text  # the failed 1003 is not averaged
    assert "so it takes at least 6 seeds" in text
    assert "Both inversions agree (inconclusive)" in text
    assert control_section(params, stats, {}, refs, values) == []


def test_per_seed_section_lists_every_run_in_seed_order():
    def run(seed, status="FINISHED", **metrics):
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics, params={"seed": str(seed)}),
                               info=SimpleNamespace(status=status))
    confirmed = {"kkt=1.0": [run(1002, ssim_nn_train_mean=0.30, diversity=0.6, collapsed=0.0),
                             run(1000, ssim_nn_train_mean=0.20, diversity=0.4, collapsed=1.0),
                             run(1001, status="FAILED"),
                             # its loss went NaN: stopped, logged collapsed, shown but not in the spread
                             run(1003, status="KILLED", nonfinite=1.0, ssim_nn_train_mean=0.9, collapsed=1.0)],
                 "kkt=0.0": [run(1000, ssim_nn_train_mean=0.26, diversity=0.5, collapsed=0.0)]}
    refs = {"kkt=1.0": {"ref_blank_ssim": 0.25}}  # kkt=0.0 has no reference points
    text = "\n".join(per_seed_section(confirmed, refs, "diversity"))
    rows = [line for line in text.splitlines() if line.startswith("| kkt=")]
    assert [r.split(" | ")[1] for r in rows] == ["1000", "1000", "1001 (excluded: failed)", "1002",
                                                 "1003 (excluded: loss non-finite)"]
    assert rows[1] == "| kkt=1.0 | 1000 | 0.200 | 0.400 | n/a | yes | n/a | n/a | n/a |"
    assert rows[2] == "| kkt=1.0 | 1001 (excluded: failed) | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"
    assert rows[4] == "| kkt=1.0 | 1003 (excluded: loss non-finite) | 0.900 | n/a | n/a | yes | n/a | n/a | n/a |"
    # sd of (0.20, 0.30) = 0.0707, of (0.4, 0.6) = 0.1414; one value: no sd; no reference: no count
    assert ("Spread over seeds (sample sd): kkt=0.0: ssim_nn_train_mean sd n/a over 1 seeds, n/a (no all-black "
            "reference) below its all-black image, diversity sd n/a; kkt=1.0: ssim_nn_train_mean sd 0.071 over "
            "2 seeds, 1 below its all-black image, diversity sd 0.141.") in text


def test_one_run_figures_show_and_label_the_true_median_seed(tmp_path, monkeypatch):
    """Hand-made runs: 4 seeds of `score` 0.9, 0.1, 0.7, 0.5 (median 0.6, halfway between seeds 1003 at
    0.5 and 1002 at 0.7: the lower middle is shown, and said to be), 3 seeds (the middle one is the
    median), and 4 seeds whose two middle runs have the same value (that value is the median)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from harness.report import figures

    def run(seed, score):
        return SimpleNamespace(data=SimpleNamespace(metrics={"score": score}, params={"seed": str(seed)}),
                               info=SimpleNamespace(status="FINISHED", run_id=f"run-{seed}-{score}"))
    basis = {"even": [run(1000, 0.9), run(1001, 0.1), run(1002, 0.7), run(1003, 0.5)],
             "odd": [run(1000, 0.2), run(1001, 0.8), run(1002, 0.4)],
             "tied": [run(1000, 0.3), run(1001, 0.6), run(1002, 0.3), run(1003, 0.1)],
             "none": [run(1000, float("nan"))]}
    shown = figures.shown_runs(basis, list(basis), "score")
    assert set(shown) == {"even", "odd", "tied"}
    assert shown["even"].median == 0.6 and shown["odd"].median == 0.4 and shown["tied"].median == 0.3
    assert figures.shown_caption(shown, "score") == (
        "Each variant is shown by its median run by score among the runs it averages: "
        "even seed 1003 (score 0.500, the lower middle of 4: their median 0.600 lies halfway between it and "
        "seed 1002 at 0.700); odd seed 1002 (score 0.400, the median of 3); "
        "tied seed 1000 (score 0.300, the median of 4).")

    class Artifacts:  # an MLflow client that has every run's grid.png and nearest.png
        def download_artifacts(self, run_id, name, dst):
            path = tmp_path / f"{run_id}-{name}"
            plt.imsave(path, np.zeros((4, 4)), cmap="gray")
            return str(path)

    titles = []

    def keep(fig, folder, name):
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        plt.close(fig)
        return name
    monkeypatch.setattr(figures, "_save", keep)
    name, caption = figures.grids_figure(Artifacts(), shown, tmp_path, "score")
    assert name == "grids.png" and caption.startswith("Each variant is shown by its median run by score") \
        and "even seed 1003 (score 0.500, the lower middle of 4" in caption
    assert titles == ["even, seed 1003 (score 0.500, lower middle of 4, median 0.600)",
                      "odd, seed 1002 (score 0.400, median of 3)", "tied, seed 1000 (score 0.300, median of 4)"]
