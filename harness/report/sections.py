"""The Markdown sections of a study report: the variants' table and reference points, the seeds,
every confirmation run, the class-level control, the tuning. Each takes run records already read
from MLflow and returns lines; what is averaged and how a claim is judged is `harness.report.verdicts`."""
from __future__ import annotations

import math
from collections import defaultdict

from harness.records.mlflow_store import TAG_STOP_REASON, TAG_VARIANT
from harness.records.results import MeanCI, best_trials, count_at_one, finite, mean_ci, sample_sd
from harness.report.verdicts import (COUNTED, SeedValues, averaged_runs, claim_values, claim_verdict, control_reading,
                              exclusion, interval_text, verdict_kind, yardstick)

TABLE_METRICS = ("score", "ssim_nn_train_mean", "ssim_nn_train_side_mean", "ssim_nn_test_mean", "memorization_gap",
                 "diversity", "evaluator_acc", "train_coverage", "heldout_coverage", "coverage_gap",
                 "coverage_gap_strict", "train_top10", "heldout_top10", "top10_gap", "collapsed", "fd_eval",
                 "params_per_train_pixel")
REFERENCES = ("ref_heldout_ssim", "ref_classmean_ssim", "ref_blank_ssim", "ref_heldout_diversity")
CONTROL_METRICS = ("ssim_nn_train_mean", "diversity", "evaluator_acc", "collapsed", "train_top10", "heldout_top10",
                   "top10_gap", "coverage_gap", "coverage_gap_strict")
PER_SEED_METRICS = ("ssim_nn_train_mean", "diversity", "evaluator_acc", "collapsed", "coverage_gap", "top10_gap",
                    "memorization_gap")


def _cell(metric: str, stat: MeanCI) -> str:
    """A count 'k of n' for a 0/1 metric (its stat is over `counted_runs`), else mean ± interval."""
    if metric in COUNTED:
        return f"{round(stat.mean * stat.n)} of {stat.n}" if stat.n else "n/a"
    return interval_text(stat)


def _ended(run) -> bool:
    """Finished or stopped early (pruned, collapsed, NaN); not failed, not left running."""
    return run.info.status in ("FINISHED", "KILLED")


def best_runs(runs: list, params: dict, top: int | None = 1) -> list:
    """The best runs by the study's own metric and mode, under `harness.records.results.best_trials`' rule."""
    return best_trials(runs, params.get("metric", "score"), params.get("mode", "max"), top,
                       metrics=lambda r: r.data.metrics, failed=lambda r: not _ended(r),
                       started=lambda r: r.info.start_time or 0)


def table_metrics(params: dict) -> tuple[str, ...]:
    """The table's metrics, plus the study's own metric and its claim's if the table lacks them."""
    extra = [params.get(k) for k in ("metric", "claim.metric")]
    return TABLE_METRICS + tuple(dict.fromkeys(m for m in extra if m and m != "None" and m not in TABLE_METRICS))


def reference_points(children: list) -> dict[str, dict[str, float]]:
    """Each variant's reference points: the mean over the given runs of that variant (the averaged
    runs: where each seed draws its own training subset, the mean over the same subsets the
    variant's means are taken over), never mixed across variants."""
    values: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in children:
        for name in REFERENCES:
            values[run.data.tags.get(TAG_VARIANT, "all")][name].append(run.data.metrics.get(name))
    return {v: {name: mean_ci(vals).mean for name, vals in by_name.items()} for v, by_name in values.items()}


def run_seeds(runs: list, key: str = "seed") -> list[int]:
    out = set()
    for r in runs:
        try:
            out.add(int(float(r.data.params[key])))
        except (KeyError, ValueError):
            continue
    return sorted(out)


def join(values: list) -> str:
    return ", ".join(str(v) for v in values) if values else "none recorded"


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def _excluded_note(runs: list) -> str:
    """' (excluded from the averages: 1002 failed, ...)' for the runs `averaged_runs` leaves out."""
    left_out = [f"{join(run_seeds([r]))} {exclusion(r)}" for r in sorted(runs, key=lambda r: run_seeds([r]) or [-1])
                if exclusion(r)]
    return f" (excluded from the averages: {', '.join(left_out)})" if left_out else ""


def left_out_lines(runs_of: dict[str, list]) -> list[str]:
    """For a sweep without a confirmation phase: per variant, how many of its trials the averages
    take, and each trial left out with why (its stop reason: pruned by ASHA at epoch 2, failed, ...)."""
    lines = []
    for v, runs in sorted(runs_of.items()):
        out = [r for r in runs if exclusion(r)]
        if not out:
            lines.append(f"- {v}: all {len(runs)} trials averaged")
            continue
        why = [f"trial {r.data.tags.get('harness.optuna_trial', r.data.tags.get('harness.trial_id', '?'))} "
               f"({r.data.tags.get(TAG_STOP_REASON) or exclusion(r)})" for r in out]
        lines.append(f"- {v}: {len(runs) - len(out)} of {len(runs)} trials averaged; left out: {', '.join(why)}")
    return ["Trials the averages take, and those left out (a trial stopped early holds values of a smaller "
            "budget):", "", *lines, ""] if lines else []


def variants_section(basis: dict[str, list], stats: dict[str, dict[str, MeanCI]], refs: dict[str, dict[str, float]],
                     variants: list[str], confirmed: bool, all_runs: dict[str, list] | None = None) -> list[str]:
    """Each variant's mean ± interval over the runs it averages (for a sweep, `all_runs` lists the
    trials left out and why), then its reference points."""
    metrics = list(next(iter(stats.values()), {}))
    runs_of = {v: len(basis.get(v, [])) for v in variants}
    lines = [f"## Variants ({'confirmation runs over seeds' if confirmed else 'finished tuning trials (no confirmation phase)'})",
             "", "Mean ± 95% confidence half-width (Student t) over the n runs of each variant that ended normally "
             "with a finite loss (the others are listed, excluded, under Seeds and Per seed); a cell with fewer "
             "finite values than that (NaN or missing in some runs) says how many it averaged. A count (collapsed) "
             "also takes the runs the collapse stopper ended: k of the runs it counts.", ""]
    lines.append("| variant | n | " + " | ".join(metrics) + " |")
    lines.append("|---|---|" + "---|" * len(metrics))
    for v in variants:
        cells = [_cell(m, stats[v][m]) + (f" (n={stats[v][m].n})" if 0 < stats[v][m].n < runs_of[v]
                                                            and m not in COUNTED else "")
                 for m in metrics]
        lines.append(f"| {v} | {runs_of[v]} | " + " | ".join(cells) + " |")
    if not confirmed and all_runs:
        lines += ["", *left_out_lines(all_runs)]
    lines += ["", "Reference points of each variant (same metric code, real data of the variant's dataset "
              "and training subset):", "", "| variant | " + " | ".join(REFERENCES) + " |",
              "|---|" + "---|" * len(REFERENCES)]
    lines += [f"| {v} | " + " | ".join(f"{refs.get(v, {}).get(k, float('nan')):.3f}" for k in REFERENCES) + " |"
              for v in variants]
    return lines + [""]


def seeds_section(tuned: dict[str, list], confirmed: dict[str, list]) -> list[str]:
    """Which seeds tuned and which confirmed each variant (and which of those are not averaged),
    and whether they are disjoint (a confirmation seed equal to a tuning seed reruns the selected
    winner itself)."""
    tune_runs = [r for runs in tuned.values() for r in runs]
    tuning = sorted(set(run_seeds(tune_runs)) | set(run_seeds(tune_runs, "classifier.seed")))
    used = (f"seeds {join(run_seeds(tune_runs))} (generator / candidates) with classifier seeds "
            f"{join(run_seeds(tune_runs, 'classifier.seed'))}")
    if not confirmed:
        return ["## Seeds", "", f"Tuning trials ran with {used}; there is no confirmation phase.", ""]
    lines = ["## Seeds", "", f"Tuning trials ran with {used}. " + seed_varies(confirmed), ""]
    for v, runs in sorted(confirmed.items()):
        lines.append(f"- {v}: seeds {join(run_seeds(runs))}" + _excluded_note(runs))
    overlap = sorted({s for runs in confirmed.values() for r in runs
                      for s in run_seeds([r]) + run_seeds([r], "classifier.seed")} & set(tuning))
    lines += ["", f"Confirmation seeds overlap the tuning seeds ({join(overlap)}): those runs may repeat a tuning "
              "trial, which biases the confirmation towards the selected winner." if overlap else
              "The confirmation seeds are disjoint from the tuning seeds.", ""]
    return lines


def seed_varies(confirmed: dict[str, list]) -> str:
    """What a confirmation seed varied, read from the runs' own params: the generator's (or
    candidates') and the classifier's initialisation always; the training subset where each run's
    `data.subset_seed` equals its seed."""
    runs = [r for rs in confirmed.values() for r in rs]
    subset = [r.data.params.get("data.subset_seed") for r in runs]
    if runs and all(s is not None and s == r.data.params.get("seed") for s, r in zip(subset, runs)):
        return ("Confirmation runs: seed s sets the generator's (or candidates') seed, the classifier's seed and the "
                "training subset's seed (data.subset_seed) to s, so each seed draws other training images and "
                "initialisations, and every variant at seed s sees the same images (paired):")
    fixed = sorted({str(s) for s in subset if s is not None})
    return ("Confirmation runs, each setting the generator's (or candidates') seed and the classifier's seed to the "
            f"same value; the training subset is the same at every seed (data.subset_seed {', '.join(fixed) or '0'}), "
            "so the spread over seeds is initialisation noise on one set of training images:")


def per_seed_section(confirmed: dict[str, list], refs: dict[str, dict[str, float]], claim_metric: str | None) -> list[str]:
    """Every confirmation run on its own line, those not averaged marked with why (a mean hides the
    one seed below the all-black image, or the one that collapsed), and the spread over the
    averaged seeds: the sample standard deviation of nn-SSIM (and of the claim's metric) per
    variant, with how many seeds sit below the variant's own all-black image."""
    metrics = list(PER_SEED_METRICS)
    if claim_metric and claim_metric != "None" and claim_metric not in metrics:
        metrics.append(claim_metric)
    lines = ["## Per seed", "", "Each confirmation run (by its seed; what a seed varied is under Seeds):", "",
             "| variant | seed | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    spread = []
    for v in sorted(confirmed):
        runs = sorted(confirmed[v], key=lambda r: run_seeds([r]) or [-1])
        for r in runs:
            cells = []
            for m in metrics:
                k, n = count_at_one([r.data.metrics.get(m)])
                cells.append(("yes" if k else "no") if m in COUNTED and n else
                             _number(float(r.data.metrics.get(m, float("nan")))))
            why = exclusion(r)
            seed = join(run_seeds([r])) + (f" (excluded: {why})" if why else "")
            lines.append(f"| {v} | {seed} | " + " | ".join(cells) + " |")
        kept = averaged_runs(runs)
        nn = finite(r.data.metrics.get("ssim_nn_train_mean") for r in kept)
        blank = refs.get(v, {}).get("ref_blank_ssim", float("nan"))
        below = f"{sum(1 for x in nn if x < blank)}" if math.isfinite(blank) else "n/a (no all-black reference)"
        part = f"{v}: ssim_nn_train_mean sd {_number(sample_sd(nn))} over {len(nn)} seeds, {below} below its all-black image"
        if claim_metric and claim_metric not in ("None", "ssim_nn_train_mean") and claim_metric not in COUNTED:
            part += f", {claim_metric} sd {_number(sample_sd(r.data.metrics.get(claim_metric) for r in kept))}"
        spread.append(part)
    return lines + ["", "Spread over seeds (sample sd): " + "; ".join(spread) + ".", ""]


def control_section(params: dict, stats: dict[str, dict[str, MeanCI]], controlled: dict[str, list],
                    refs: dict[str, dict[str, float]], values: dict[str, SeedValues]) -> list[str]:
    """The class-level control: the same classifiers (one per confirmation seed) inverted with the
    study's `control` settings, untuned; its table, the claim judged on it, and the joint reading.
    `stats` and `values` (`claim_values`) are the study's own inversions, judged beside it."""
    if not controlled:
        return []
    variants = sorted(controlled)
    kept = {v: averaged_runs(controlled[v]) for v in variants}
    metrics = list(CONTROL_METRICS)
    metric = params.get("claim.metric")
    if metric and metric != "None" and metric not in CONTROL_METRICS:
        metrics.append(metric)
    cstats = {v: {m: mean_ci(r.data.metrics.get(m) for r in kept[v]) for m in metrics} for v in variants}
    inverter = {v: sorted({r.data.params.get("inverter", "?") for r in controlled[v]}) for v in variants}
    lines = ["## Class-level control", "",
             "The classifiers of the confirmation seeds inverted once more with the study's fixed `control` "
             "settings (no tuning): " + "; ".join(f"{v}: {join(inverter[v])} inverter, seeds "
                                                 f"{join(run_seeds(controlled[v]))}{_excluded_note(controlled[v])}"
                                                 for v in variants) + ".", "",
             "| variant | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    lines += [f"| {v} | {len(kept[v])} | " + " | ".join(_cell(m, cstats[v][m]) for m in metrics)
              + " |" for v in variants]
    control_verdict = claim_verdict(params, cstats, refs, claim_values(kept, params))
    inverted = claim_verdict(params, stats, refs, values)
    lines += ["", f"The claim on the control: {control_verdict}", "",
              control_reading(verdict_kind(inverted), verdict_kind(control_verdict),
                              params.get("claim.reference") not in (None, "None")), "",
              yardstick(cstats, refs, metric).replace("Against the reference points", "The control against the "
                                                       "reference points", 1), ""]
    return lines


def tuning_section(tuned: dict[str, list], params: dict) -> list[str]:
    metric = params.get("metric", "score")
    lines = ["## Tuning", "", f"| variant | trials | finished | pruned/stopped | failed | best {metric} | best settings |",
             "|---|---|---|---|---|---|---|"]
    searched = [k.removeprefix("search.").removesuffix(".dist") for k in params if k.startswith("search.") and k.endswith(".dist")]
    for v, runs in sorted(tuned.items()):
        status = defaultdict(int)
        for r in runs:
            status[r.info.status] += 1
        best = next(iter(best_runs(runs, params)), None)
        settings = ", ".join(f"{k}={_short(best.data.params[k])}" for k in searched if best and k in best.data.params)
        lines.append(f"| {v} | {len(runs)} | {status['FINISHED']} | {status['KILLED']} | {status['FAILED']} | "
                     f"{best.data.metrics[metric]:.3f} | {settings} |" if best else
                     f"| {v} | {len(runs)} | {status['FINISHED']} | {status['KILLED']} | {status['FAILED']} | n/a | - |")
    if searched:
        lines += ["", sampler_summary(tuned, params)]
    reasons = defaultdict(int)
    for runs in tuned.values():
        for r in runs:
            if r.info.status != "FINISHED":
                reasons[r.data.tags.get(TAG_STOP_REASON, "?").split(" at ")[0]] += 1
    if reasons:
        lines += ["", "Stopped early: " + ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items()))]
    return lines + [""]


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def tpe_history(spans: list[tuple[float, float | None]], startup: int) -> tuple[int, list[int]]:
    """From the (start, end) times of one variant's tuning trials: how many were TPE's random
    start-up trials (the first `startup` to start), and for each later trial how many trials had
    ended, and so could be modelled, when it started."""
    spans = sorted(spans)
    random = min(startup, len(spans))
    seen = [sum(1 for s, e in spans if e is not None and e <= start) for start, _ in spans[random:]]
    return random, seen


def sampler_summary(tuned: dict[str, list], params: dict) -> str:
    """What the tuner actually did, per variant: random start-up trials, TPE trials, and how many
    ended trials TPE had to model when it drew each of its own."""
    startup = int(float(params.get("tpe_startup_trials", 10)))
    limit = params.get("resources.max_concurrent", "None")
    history = {v: tpe_history([(r.info.start_time, r.info.end_time) for r in runs], startup)
               for v, runs in sorted(tuned.items())}
    parts = []
    for v, (random, seen) in history.items():
        part = f"{v}: {random} random start-up, {len(seen)} from TPE"
        if seen:
            part += f" (ended trials it could model when each was drawn: {', '.join(map(str, seen))})"
        parts.append(part)
    concurrency = "all at once" if limit in ("None", None, "") else f"at most {limit} at a time"
    note = ""
    if all(not any(seen) for _, seen in history.values()):
        note = " No TPE trial had an ended trial to model: this search was random."
    return (f"Sampler: seeded TPE, the first {startup} trials of each variant drawn at random (its start-up "
            f"phase), trials run {concurrency}. " + "; ".join(parts) + "." + note)
