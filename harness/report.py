"""`harness report` and `harness compare`: read a study from MLflow (runs, metric histories,
artifacts) and turn it into a Markdown report with PNG figures that test the study's claim."""
from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote, urlparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harness.config import ConfigError  # noqa: E402
from harness.mlflow_store import (TAG_OPTUNA_STORAGE, TAG_PHASE, TAG_STOP_REASON,  # noqa: E402
                                  TAG_VARIANT, child_runs, client_for, newest_parent)
from harness.results import (MeanCI, best_trials, count_at_one, finite, fisher_greater, mean_ci,  # noqa: E402
                             sample_sd)

TABLE_METRICS = ("score", "ssim_nn_train_mean", "ssim_nn_test_mean", "memorization_gap", "diversity",
                 "evaluator_acc", "train_coverage", "heldout_coverage", "coverage_gap", "train_top10",
                 "heldout_top10", "top10_gap", "collapsed", "fd_eval", "params_per_train_pixel")
LAW_METRICS = ("coverage_gap", "train_top10", "heldout_top10")
REFERENCES = ("ref_heldout_ssim", "ref_classmean_ssim", "ref_blank_ssim", "ref_heldout_diversity")


def _fmt(stat: MeanCI) -> str:
    if not math.isfinite(stat.mean):
        return "n/a"
    if not (math.isfinite(stat.low) and math.isfinite(stat.high)):
        return f"{stat.mean:.3f}"
    return f"{stat.mean:.3f} ± {(stat.high - stat.low) / 2:.3f}"


COUNTED = ("collapsed",)  # 0/1 per run: a count ("1 of 3") reads better than a t-interval


def count_cell(values) -> str:
    """'k of n' for a 0/1 metric over runs: k runs at 1 among the n finite values."""
    k, n = count_at_one(values)
    return f"{k} of {n}" if n else "n/a"


def _cell(metric: str, runs: list, stat: MeanCI) -> str:
    if metric in COUNTED:
        return count_cell(r.data.metrics.get(metric) for r in runs)
    return _fmt(stat)


def _ended(run) -> bool:
    """Finished or stopped early (pruned, collapsed, NaN); not failed, not left running."""
    return run.info.status in ("FINISHED", "KILLED")


def best_runs(runs: list, params: dict, top: int | None = 1) -> list:
    """The best runs by the study's own metric and mode, under `harness.results.best_trials`' rule."""
    return best_trials(runs, params.get("metric", "score"), params.get("mode", "max"), top,
                       metrics=lambda r: r.data.metrics, failed=lambda r: not _ended(r))


def load_study(experiment: str, uri: str):
    """(client, parent run, children) of the newest study (or, if none, sweep) in `experiment`:
    the parent found by its tag, its children by the parent's id, every page of them."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no experiment named {experiment!r} in {uri}; "
                          "check the name (= the study's name) and --mlflow-uri")
    parent = newest_parent(client, exp.experiment_id, "study") or newest_parent(client, exp.experiment_id, "sweep")
    if parent is None:
        raise ConfigError(f"--experiment: {experiment!r} holds no study or sweep runs; run `harness ablate` first")
    children = child_runs(client, exp.experiment_id, parent.info.run_id)
    if not children:
        raise ConfigError(f"--experiment: the newest study in {experiment!r} has no trial runs")
    return client, parent, children


def claim_verdict(params: dict, stats: dict[str, dict[str, MeanCI]], refs: dict[str, dict[str, float]]) -> str:
    """supported / not supported / inconclusive for the study's claim, with the numbers: two
    variants by whether their confidence intervals separate, or a variant against its own
    reference point (`refs[variant][name]`) by whether its interval lies above or below it."""
    metric = params.get("claim.metric")
    if not metric or metric == "None":
        return "No claim is attached to this study (add `claim:` to its sweep file)."
    greater, lesser, reference = params.get("claim.greater"), params.get("claim.lesser"), params.get("claim.reference")
    statement = params.get("claim.statement", "")
    if greater not in stats or metric not in stats[greater]:
        return f"**inconclusive**: {statement}: variant {greater} has no confirmed runs."
    g = stats[greater][metric]
    if lesser and lesser != "None":
        if lesser not in stats:
            return f"**inconclusive**: {statement}: variant {lesser} has no confirmed runs."
        l_ = stats[lesser][metric]
        if metric in COUNTED:
            return count_verdict(statement, metric, greater, g, lesser, l_)
        numbers = (f"{metric}: {greater} {_fmt(g)} (n={g.n}) vs {lesser} {_fmt(l_)} (n={l_.n}) "
                   "(mean ± 95% CI half-width over seeds)")
        if g.low > l_.high:
            return f"**supported**: {statement}. {numbers}; the intervals separate."
        if l_.low > g.high:
            return f"**not supported** (the opposite holds): {statement}. {numbers}; the intervals separate the other way."
        return f"**inconclusive**: {statement}. {numbers}; the intervals overlap."
    ref_value = refs.get(greater, {}).get(reference, float("nan"))
    numbers = f"{metric} of {greater}: {_fmt(g)} (n={g.n}) vs its {reference} = {ref_value:.3f}"
    if not math.isfinite(ref_value):
        return f"**inconclusive**: {statement}: variant {greater} has no {reference} value."
    if g.low > ref_value:
        return f"**supported**: {statement}. {numbers}; the interval lies above the reference."
    if g.high < ref_value:
        return f"**not supported**: {statement}. {numbers}; the interval lies below the reference."
    return f"**inconclusive**: {statement}. {numbers}; the interval contains the reference."


def count_verdict(statement: str, metric: str, greater: str, g: MeanCI, lesser: str, l_: MeanCI) -> str:
    """A claim on a 0/1 metric (collapsed) compares counts of runs, by Fisher's exact test (one-sided,
    5%): a t-interval over 0/1 values has zero width at 0 of 3 and 3 of 3 and would call any
    difference significant."""
    if not (g.n and l_.n):
        return f"**inconclusive**: {statement}: {metric} was not recorded for {greater if not g.n else lesser}."
    kg, kl = round(g.mean * g.n), round(l_.mean * l_.n)
    p, p_reverse = fisher_greater(kg, g.n, kl, l_.n), fisher_greater(kl, l_.n, kg, g.n)
    numbers = (f"{metric}: {greater} {kg} of {g.n} vs {lesser} {kl} of {l_.n} (Fisher's exact test, one-sided "
               f"p = {p:.3f}; the reverse p = {p_reverse:.3f})")
    if p < 0.05:
        return f"**supported**: {statement}. {numbers}; the counts separate at p < 0.05."
    if p_reverse < 0.05:
        return f"**not supported** (the opposite holds): {statement}. {numbers}; the counts separate the other way."
    return f"**inconclusive**: {statement}. {numbers}; the counts do not separate at p < 0.05."


CONTROL_METRICS = ("ssim_nn_train_mean", "diversity", "evaluator_acc", "collapsed", "train_top10", "heldout_top10",
                   "top10_gap", "coverage_gap")


def verdict_kind(verdict: str) -> str:
    """supported / not supported / inconclusive / none, from the bold word that opens a verdict."""
    for kind in ("supported", "not supported", "inconclusive"):
        if verdict.startswith(f"**{kind}**"):
            return kind
    return "none"


def control_reading(inverted: str, control: str, against_reference: bool = False) -> str:
    """What the claim's verdict on the study's inversions (`inverted`) and on the class-level
    control (`control`, the same classifiers inverted directly) say together; a claim against a
    reference point (`against_reference`) is read as whether each inversion beats it."""
    if inverted == "none" or control == "none":
        return "No claim to read the control against."
    if against_reference:
        if inverted == control:
            return f"Both inversions agree ({inverted}): the control does not change the reading."
        if inverted == "supported":
            return ("Only the generator beats the reference; a direct inversion of the same classifiers does not: "
                    "it is how the generator inverts the classifier, not the classifier alone.")
        if control == "supported":
            return ("The direct inversion of the same classifiers beats the reference and the generator does not: "
                    "the classifiers hold it, the study's inversion does not get there.")
        return f"The two inversions disagree (generator: {inverted}; control: {control}): read neither alone."
    if inverted == control == "supported":
        return ("Both inversions show it: the difference lies in the classifiers, not in how the generator "
                "inverts them.")
    if inverted == control:
        return f"Both inversions agree ({inverted}): the control does not change the reading."
    if "not supported" in (inverted, control):
        return f"The two inversions disagree (generator: {inverted}; control: {control}): read neither alone."
    if inverted == "supported":
        return ("Only the generator shows it: a direct inversion of the same classifiers does not, so the "
                "difference may come from how the generator inverts each classifier rather than from what the "
                "classifiers hold.")
    if control == "supported":
        return ("The classifiers differ (the direct inversion shows it) but the generator does not carry the "
                "difference through: the study's inversion is the limit here.")
    return f"The two inversions disagree (generator: {inverted}; control: {control}): read neither alone."


def control_section(params: dict, stats: dict[str, dict[str, MeanCI]], controlled: dict[str, list],
                    refs: dict[str, dict[str, float]]) -> list[str]:
    """The class-level control: the same classifiers (one per confirmation seed) inverted with the
    study's `control` settings, untuned; its table, the claim judged on it, and the joint reading."""
    if not controlled:
        return []
    variants = sorted(controlled)
    cstats = {v: {m: mean_ci(r.data.metrics.get(m) for r in controlled[v]) for m in CONTROL_METRICS} for v in variants}
    metric = params.get("claim.metric")
    if metric and metric != "None" and metric not in CONTROL_METRICS:
        for v in variants:
            cstats[v][metric] = mean_ci(r.data.metrics.get(metric) for r in controlled[v])
    metrics = list(cstats[variants[0]])
    inverter = {v: sorted({r.data.params.get("inverter", "?") for r in controlled[v]}) for v in variants}
    seeds = {v: _seeds(controlled[v]) for v in variants}
    lines = ["## Class-level control", "",
             "The classifiers of the confirmation seeds inverted once more with the study's fixed `control` "
             "settings (no tuning): " + "; ".join(f"{v}: {_join(inverter[v])} inverter, seeds {_join(seeds[v])}"
                                                 for v in variants) + ".", "",
             "| variant | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    lines += [f"| {v} | {len(controlled[v])} | " + " | ".join(_cell(m, controlled[v], cstats[v][m]) for m in metrics)
              + " |" for v in variants]
    control_verdict = claim_verdict(params, cstats, refs)
    inverted = claim_verdict(params, stats, refs)
    lines += ["", f"The claim on the control: {control_verdict}", "",
              control_reading(verdict_kind(inverted), verdict_kind(control_verdict),
                              params.get("claim.reference") not in (None, "None")), "",
              yardstick(cstats, refs, metric).replace("Against the reference points", "The control against the "
                                                       "reference points", 1), ""]
    return lines


PER_IMAGE_METRICS = ("train_coverage", "heldout_coverage", "coverage_gap", "train_top10", "heldout_top10",
                     "top10_gap")


def yardstick(stats: dict[str, dict[str, MeanCI]], refs: dict[str, dict[str, float]],
              claim_metric: str | None = None) -> str:
    """Where each variant's mean nn-SSIM sits among its own reference points (a variant of the
    dataset or the training subset has reference points of its own): a verdict between two
    variants that both lie below the all-black image compares failures, and should say so."""
    nan = float("nan")
    parts, below = [], []
    for v, st in stats.items():
        own = refs.get(v, {})
        blank, mean_img = own.get("ref_blank_ssim", nan), own.get("ref_classmean_ssim", nan)
        value = st["ssim_nn_train_mean"].mean
        where = ("below its all-black image" if value < blank else
                 "above its all-black image, below its class-mean image" if value < mean_img else
                 "above its class-mean image" if value >= mean_img else "not comparable")
        below.append(value < blank)
        parts.append(f"{v} {value:.3f} ({where}; all-black {blank:.3f}, class mean {mean_img:.3f}, "
                     f"held-out real {own.get('ref_heldout_ssim', nan):.3f})")
    line = "Against the reference points, mean ssim_nn_train_mean: " + "; ".join(parts) + "."
    if stats and all(below) and claim_metric in PER_IMAGE_METRICS:
        line += (f" No variant's mean beats the all-black image, but this study's claim is judged per image "
                 f"({claim_metric}): a mean over every candidate, most of which match no image, hides the "
                 "few that are recovered.")
    elif stats and all(below):
        line += (" No variant beats the all-black image: at this budget the inversions are not "
                 "training-like, and the verdict compares failures.")
    return line


def _artifact(client, run_id: str, name: str, into: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, name, str(into)))
    except Exception:
        return None


class NotDrawn(Exception):
    """A figure the report promises could not be made; the message says why (it goes in the report)."""


def unreadable_reason(client, run_id: str, name: str, exc: Exception) -> str:
    """Why an artifact could not be read: most often a store moved to another machine, whose runs
    still point at absolute artifact folders of the machine that wrote them."""
    try:
        uri = client.get_run(run_id).info.artifact_uri
    except Exception:
        uri = ""
    if uri.startswith("file:") or uri.startswith("/"):
        folder = Path(unquote(urlparse(uri).path))
        if not folder.exists():
            return (f"the run's artifact folder {folder} does not exist on this machine (a store copied from "
                    "elsewhere keeps the old absolute paths; see the README on moving a store)")
        return f"the run has no artifact {name!r} in {folder}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class ReadingClient:
    """An MlflowClient that remembers every artifact it could not download, and why."""

    def __init__(self, client):
        self._client, self.unreadable = client, []

    def __getattr__(self, name):
        return getattr(self._client, name)

    def download_artifacts(self, run_id: str, path: str, dst_path: str | None = None) -> str:
        try:
            return self._client.download_artifacts(run_id, path, dst_path)
        except Exception as exc:
            self.unreadable.append((run_id, path, unreadable_reason(self._client, run_id, path, exc)))
            raise


def write_report(experiment: str, uri: str, out_dir: Path | None = None) -> Path:
    client, parent, children = load_study(experiment, uri)
    client = ReadingClient(client)
    out = out_dir or Path("reports") / experiment
    params = parent.data.params
    by_phase: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in children:
        by_phase[run.data.tags.get(TAG_PHASE, "tune")][run.data.tags.get(TAG_VARIANT, "all")].append(run)
    tuned = by_phase.get("tune", {})
    confirmed = by_phase.get("confirm", {})
    basis = confirmed or {v: [r for r in runs if r.info.status == "FINISHED"] for v, runs in tuned.items()}
    variants = sorted(set(tuned) | set(confirmed))
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)

    metrics = _table_metrics(params)
    stats = {v: {m: mean_ci(r.data.metrics.get(m) for r in basis.get(v, [])) for m in metrics} for v in variants}
    refs = reference_points([r for r in children if r.data.tags.get(TAG_PHASE) != "control"])
    lines = [f"# Study `{experiment}`", "", params.get("description", ""), ""]
    command = parent.data.tags.get("harness.command")
    if command:
        lines += ["Made with:", "", "```bash", command, f"harness report --experiment {experiment} --mlflow-uri {uri}",
                  "```", ""]
    lines += ["## Verdict", "", claim_verdict(params, stats, refs), "",
              yardstick(stats, refs, params.get("claim.metric")), ""]
    lines += seeds_section(tuned, confirmed, basis)
    runs_of = {v: len(basis.get(v, [])) for v in variants}
    lines += [f"## Variants ({'confirmation runs over seeds' if confirmed else 'finished tuning trials (no confirmation phase)'})",
              "", "Mean ± 95% confidence half-width (Student t) over the n runs of each variant; a cell "
              "with fewer finite values than that (NaN or missing in some runs) says how many it averaged.", ""]
    lines.append("| variant | n | " + " | ".join(metrics) + " |")
    lines.append("|---|---|" + "---|" * len(metrics))
    for v in variants:
        cells = [_cell(m, basis.get(v, []), stats[v][m]) + (f" (n={stats[v][m].n})" if 0 < stats[v][m].n < runs_of[v]
                                                            and m not in COUNTED else "")
                 for m in metrics]
        lines.append(f"| {v} | {runs_of[v]} | " + " | ".join(cells) + " |")
    lines += ["", "Reference points of each variant (same metric code, real data of the variant's dataset "
              "and training subset):", "", "| variant | " + " | ".join(REFERENCES) + " |",
              "|---|" + "---|" * len(REFERENCES)]
    lines += [f"| {v} | " + " | ".join(f"{refs.get(v, {}).get(k, float('nan')):.3f}" for k in REFERENCES) + " |"
              for v in variants]
    lines.append("")
    if confirmed:
        lines += per_seed_section(confirmed, refs, params.get("claim.metric"))
    lines += control_section(params, stats, by_phase.get("control", {}), refs)
    lines += tuning_section(tuned, params)
    lines += ["## Figures", ""]
    for title, make in (("Best inversion of each variant (top: its generator's or candidate bank's images) and their nearest training images (bottom)",
                         lambda: grids_figure(client, basis, variants, figures, params)),
                        ("Sorted per-training-image best SSIM (Haim et al.'s view)",
                         lambda: coverage_figure(client, basis, variants, figures)),
                        ("Leakage against parameters per training pixel, p/(d·n) (mean ± 95% CI over runs)",
                         lambda: law_figure(basis, variants, figures)),
                        ("Best training and held-out reconstructions of each variant's best run",
                         lambda: reconstructions_figure(client, basis, variants, figures)),
                        ("Score vs epoch of every tuning trial (dashed: stopped early)",
                         lambda: score_curves_figure(client, tuned, variants, figures)),
                        ("Collapse rate per variant", lambda: collapse_figure(tuned, confirmed, variants, figures)),
                        ("Loss-weight importance (Optuna, per variant)",
                         lambda: importance_figure(client, parent, variants, figures, params))):
        lines += [f"### {title}", ""]
        try:
            made = make()
        except NotDrawn as why:
            lines += [f"Not drawn: {why}", ""]
            continue
        name, note = made if isinstance(made, tuple) else (made, "")
        if name:
            lines += [f"![{title}](figures/{name})", ""]
        if note:
            lines += [note, ""]
    if client.unreadable:
        lines += ["## Artifacts that could not be read", "",
                  "The figures above leave these out:", "", "| run | artifact | why |", "|---|---|---|"]
        names = {r.info.run_id: r.info.run_name or r.info.run_id for r in [parent, *children]}
        lines += [f"| {names.get(run_id, run_id)} | {name} | {why} |" for run_id, name, why in client.unreadable]
        lines.append("")
    report = out / "README.md"
    report.write_text("\n".join(lines))
    return report


def _table_metrics(params: dict) -> tuple[str, ...]:
    """The table's metrics, plus the study's own metric and its claim's if the table lacks them."""
    extra = [params.get(k) for k in ("metric", "claim.metric")]
    return TABLE_METRICS + tuple(dict.fromkeys(m for m in extra if m and m != "None" and m not in TABLE_METRICS))


def reference_points(children: list) -> dict[str, dict[str, float]]:
    """Each variant's reference points: the mean over its own runs (they share its data, so
    they agree), never mixed across variants that differ in dataset or training subset."""
    values: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in children:
        for name in REFERENCES:
            values[run.data.tags.get(TAG_VARIANT, "all")][name].append(run.data.metrics.get(name))
    return {v: {name: mean_ci(vals).mean for name, vals in by_name.items()} for v, by_name in values.items()}


def _seeds(runs: list, key: str = "seed") -> list[int]:
    out = set()
    for r in runs:
        try:
            out.add(int(float(r.data.params[key])))
        except (KeyError, ValueError):
            continue
    return sorted(out)


def seeds_section(tuned: dict[str, list], confirmed: dict[str, list], basis: dict[str, list]) -> list[str]:
    """Which seeds tuned and which confirmed each variant, and whether they are disjoint (a
    confirmation seed equal to a tuning seed reruns the selected winner itself)."""
    tune_runs = [r for runs in tuned.values() for r in runs]
    tuning = sorted(set(_seeds(tune_runs)) | set(_seeds(tune_runs, "classifier.seed")))
    used = (f"seeds {_join(_seeds(tune_runs))} (generator / candidates) with classifier seeds "
            f"{_join(_seeds(tune_runs, 'classifier.seed'))}")
    if not confirmed:
        return ["## Seeds", "", f"Tuning trials ran with {used}; there is no confirmation phase.", ""]
    lines = ["## Seeds", "", f"Tuning trials ran with {used}. "
             "Confirmation runs, each setting both seeds to the same value:", ""]
    for v, runs in sorted(confirmed.items()):
        seeds = _seeds(runs)
        averaged = _seeds([r for r in basis.get(v, []) if _ended(r)])
        lost = [s for s in seeds if s not in averaged]
        lines.append(f"- {v}: seeds {_join(seeds)}" + (f" (not ended: {_join(lost)})" if lost else ""))
    overlap = sorted({s for runs in confirmed.values() for r in runs for s in _seeds([r]) + _seeds([r], "classifier.seed")}
                     & set(tuning))
    lines += ["", f"Confirmation seeds overlap the tuning seeds ({_join(overlap)}): those runs may repeat a tuning "
              "trial, which biases the confirmation towards the selected winner." if overlap else
              "The confirmation seeds are disjoint from the tuning seeds.", ""]
    return lines


PER_SEED_METRICS = ("ssim_nn_train_mean", "diversity", "evaluator_acc", "collapsed", "coverage_gap", "top10_gap",
                    "memorization_gap")


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def per_seed_section(confirmed: dict[str, list], refs: dict[str, dict[str, float]], claim_metric: str | None) -> list[str]:
    """Every confirmation run on its own line (a mean hides the one seed below the all-black image,
    or the one that collapsed), and the spread over seeds: the sample standard deviation of
    nn-SSIM (and of the claim's metric) per variant, with how many seeds sit below the variant's
    own all-black image."""
    metrics = list(PER_SEED_METRICS)
    if claim_metric and claim_metric != "None" and claim_metric not in metrics:
        metrics.append(claim_metric)
    lines = ["## Per seed", "", "Each confirmation run (seed = generator and classifier seed):", "",
             "| variant | seed | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    spread = []
    for v in sorted(confirmed):
        runs = sorted(confirmed[v], key=lambda r: _seeds([r]) or [-1])
        for r in runs:
            cells = []
            for m in metrics:
                k, n = count_at_one([r.data.metrics.get(m)])
                cells.append(("yes" if k else "no") if m in COUNTED and n else
                             _number(float(r.data.metrics.get(m, float("nan")))))
            seed = _join(_seeds([r])) + ("" if _ended(r) else f" ({r.info.status.lower()})")
            lines.append(f"| {v} | {seed} | " + " | ".join(cells) + " |")
        nn = finite(r.data.metrics.get("ssim_nn_train_mean") for r in runs)
        blank = refs.get(v, {}).get("ref_blank_ssim", float("nan"))
        below = f"{sum(1 for x in nn if x < blank)}" if math.isfinite(blank) else "n/a (no all-black reference)"
        part = f"{v}: ssim_nn_train_mean sd {_number(sample_sd(nn))} over {len(nn)} seeds, {below} below its all-black image"
        if claim_metric and claim_metric not in ("None", "ssim_nn_train_mean") and claim_metric not in COUNTED:
            part += f", {claim_metric} sd {_number(sample_sd(r.data.metrics.get(claim_metric) for r in runs))}"
        spread.append(part)
    return lines + ["", "Spread over seeds (sample sd): " + "; ".join(spread) + ".", ""]


def _join(values: list) -> str:
    return ", ".join(str(v) for v in values) if values else "none recorded"


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


def _save(fig, figures: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(figures / name, dpi=110)
    plt.close(fig)
    return name


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def grids_figure(client, basis, variants, figures: Path, params: dict) -> str | None:
    metric = params.get("metric", "score")
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            best = next(iter(best_runs(basis.get(v, []), params)), None)
            if best is None:
                continue
            grid = _artifact(client, best.info.run_id, "grid.png", Path(tmp) / f"{v}-g")
            near = _artifact(client, best.info.run_id, "nearest.png", Path(tmp) / f"{v}-n")
            if grid and near:
                panels.append((v, best.data.metrics[metric], plt.imread(grid), plt.imread(near)))
    if not panels:
        raise NotDrawn("no variant's best run has a readable grid.png and nearest.png "
                       "(see the artifacts that could not be read, below)")
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 8.5), squeeze=False)
    for j, (v, value, grid, near) in enumerate(panels):
        axes[0, j].imshow(grid)
        axes[0, j].set_title(f"{v} ({metric} {value:.3f})", fontsize=9)
        axes[1, j].imshow(near)
        for ax in axes[:, j]:
            ax.axis("off")
    return _save(fig, figures, "grids.png")


def coverage_figure(client, basis, variants, figures: Path) -> str | None:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(variants):
            for k, run in enumerate(basis.get(v, [])):
                path = _artifact(client, run.info.run_id, "per_train_best_ssim.json", Path(tmp) / run.info.run_id)
                if path is None:
                    continue
                curve = json.loads(path.read_text())
                ax.plot(range(len(curve)), curve, color=f"C{i}", alpha=0.8, label=v if k == 0 else None)
                drawn = True
    if not drawn:
        plt.close(fig)
        raise NotDrawn("no run has a readable per_train_best_ssim.json (see the artifacts that could not be "
                       "read, below)")
    ax.axhline(0.4, color="grey", ls=":", lw=1, label="reconstruction bar 0.4")
    ax.set_xlabel("training images, sorted")
    ax.set_ylabel("best SSIM of any generated image")
    ax.legend(fontsize=8)
    return _save(fig, figures, "per_train_best_ssim.png")


def score_curves_figure(client, tuned, variants, figures: Path) -> str | None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for i, v in enumerate(variants):
        for k, run in enumerate(tuned.get(v, [])):
            history = client.get_metric_history(run.info.run_id, "score")
            if not history:
                continue
            steps, values = zip(*sorted((m.step, m.value) for m in history))
            ax.plot(steps, values, color=f"C{i}", ls="-" if run.info.status == "FINISHED" else "--",
                    alpha=0.7, lw=1, label=v if k == 0 else None)
            if run.info.status != "FINISHED":
                ax.plot(steps[-1], values[-1], "x", color=f"C{i}", ms=5)
            drawn = True
    if not drawn:
        plt.close(fig)
        raise NotDrawn("no tuning trial logged a score")
    ax.set_xlabel("epoch")
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    return _save(fig, figures, "score_vs_epoch.png")


def collapse_figure(tuned, confirmed, variants, figures: Path) -> str | None:
    def rate(runs):
        vals = [r.data.metrics.get("collapsed") for r in runs if "collapsed" in r.data.metrics]
        return sum(vals) / len(vals) if vals else float("nan")
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(variants), 3.5))
    x = range(len(variants))
    ax.bar([i - 0.2 for i in x], [rate(tuned.get(v, [])) for v in variants], 0.4, label="tuning trials")
    if confirmed:
        ax.bar([i + 0.2 for i in x], [rate(confirmed.get(v, [])) for v in variants], 0.4, label="confirmation runs")
    ax.set_xticks(list(x))
    ax.set_xticklabels(variants, fontsize=8, rotation=15)
    ax.set_ylabel("collapsed at the end")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, figures, "collapse_rate.png")


def find_optuna_storage(client, parent, into: Path) -> str:
    """The Optuna studies of a sweep or study: the `optuna.db` attached to the parent run, else
    the sweep folder's live `optuna.db` named by the parent's tag (an interrupted sweep)."""
    db = _artifact(client, parent.info.run_id, "optuna.db", into)
    if db is not None:
        return f"sqlite:///{db}"
    tagged = parent.data.tags.get(TAG_OPTUNA_STORAGE)
    if tagged and Path(tagged.removeprefix("sqlite:///")).exists():
        return tagged
    where = f", and none at {tagged.removeprefix('sqlite:///')}" if tagged else ""
    raise NotDrawn(f"no Optuna study was found: no readable optuna.db among the parent run's artifacts{where} "
                   "(a sweep without a `search`, a store from before studies were persisted, or a moved store)")


def importance_figure(client, parent, variants, figures: Path, params: dict) -> tuple[str | None, str]:
    """PED-ANOVA importance (Optuna's default evaluator, named here so the label stays true) of the
    searched settings for the score, per variant, on the trials that ran the whole epoch budget
    (Optuna COMPLETE) only: a trial stopped early has a score from a shorter budget, and mixing
    budgets would measure how long trials ran, not the settings."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    from harness.optuna_study import complete_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results, counts, skipped, pareto = {}, {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        storage = find_optuna_storage(client, parent, Path(tmp))
        for v in variants:
            name = f"{params.get('name', '')}/{v}"
            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                skipped.append(f"{v}: no study {name!r}")
                continue
            complete = complete_trials(study)
            counts[v] = (len(complete), len(study.trials))
            if len(study.directions) > 1:
                pareto.append(pareto_figure(study, v, figures))
            elif len(complete) < 2:
                skipped.append(f"{v}: {len(complete)} of {len(study.trials)} trials ran the whole budget "
                               "(importance needs at least 2)")
            else:
                try:
                    results[v] = optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
                except Exception as exc:  # e.g. every complete trial has the same settings
                    skipped.append(f"{v}: {(str(exc).splitlines() or [type(exc).__name__])[0]}")
    rule = ("PED-ANOVA importance, computed on the trials that ran the whole epoch budget (Optuna state COMPLETE) only; trials "
            "stopped early by ASHA, the collapse stopper or a NaN loss are PRUNED in the study and left out, "
            "since their score comes from a shorter budget. Complete / all trials: " +
            ", ".join(f"{v} {c}/{n}" for v, (c, n) in counts.items()) + ".")
    note = rule + ("" if not skipped else " Left out: " + "; ".join(skipped) + ".")
    note += "".join(f"\n\n![Pareto front, {v}](figures/{f})" for v, f in pareto)
    if not results:
        if pareto:
            return None, note
        raise NotDrawn(note)
    keys = sorted({k for imp in results.values() for k in imp})
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(keys) + 1.5))
    height = 0.8 / len(results)
    for i, (v, imp) in enumerate(results.items()):
        ax.barh([j + i * height for j in range(len(keys))], [imp.get(k, 0) for k in keys], height, label=v)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(keys))])
    ax.set_yticklabels(keys, fontsize=8)
    ax.set_xlabel("importance (PED-ANOVA) for the score, complete trials only")
    ax.legend(fontsize=8)
    return _save(fig, figures, "importance.png"), note


def pareto_figure(study, variant: str, figures: Path) -> tuple[str, str]:
    import optuna

    ax = optuna.visualization.matplotlib.plot_pareto_front(study)
    name = f"pareto-{variant}.png"
    ax.figure.savefig(figures / name, dpi=110)
    plt.close(ax.figure)
    return variant, name


def compare_runs(run_ids: list[str], uri: str) -> str:
    """A Markdown table: the params that differ between the runs, then every metric."""
    client = client_for(uri)
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except Exception:
            raise ConfigError(f"run_ids: no run {run_id!r} in {uri}") from None
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    params = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in params if len({r.data.params.get(k) for r in runs}) > 1]
    metrics = sorted({k for r in runs for k in r.data.metrics})
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {k} | " + " | ".join(str(r.data.params.get(k, "-")) for r in runs) + " |" for k in differing]
    lines.append("| **status** | " + " | ".join(r.info.status for r in runs) + " |")
    problems = [_artifacts_problem(client, r) for r in runs]
    lines.append("| **artifacts** | " + " | ".join(
        "not readable (below)" if why else ", ".join(a.path for a in client.list_artifacts(r.info.run_id)) or "none"
        for r, why in zip(runs, problems)) + " |")
    for k in metrics:
        lines.append(f"| {k} | " + " | ".join(f"{r.data.metrics[k]:.4g}" if k in r.data.metrics else "-"
                                              for r in runs) + " |")
    unreadable = [f"- {n}: {why}" for n, why in zip(names, problems) if why]
    if unreadable:
        lines += ["", "Artifacts that could not be read:", *unreadable]
    return "\n".join(lines)


def _artifacts_problem(client, run) -> str | None:
    """None when the run's artifacts can be listed, else why not."""
    uri = run.info.artifact_uri or ""
    if (uri.startswith("file:") or uri.startswith("/")) and not Path(unquote(urlparse(uri).path)).exists():
        return unreadable_reason(client, run.info.run_id, "", FileNotFoundError(uri))
    try:
        client.list_artifacts(run.info.run_id)
    except Exception as exc:
        return unreadable_reason(client, run.info.run_id, "", exc)
    return None


def law_figure(basis, variants, figures: Path) -> str | None:
    """Per-image leakage against the classifier's parameters per training pixel (the axis on which
    the reconstruction literature places its regimes), one point per variant, log x axis."""
    points = []
    for v in variants:
        runs = basis.get(v, [])
        xs = [r.data.metrics["params_per_train_pixel"] for r in runs if "params_per_train_pixel" in r.data.metrics]
        if xs:
            points.append((sum(xs) / len(xs), v, {m: mean_ci([r.data.metrics.get(m, float("nan")) for r in runs])
                                                   for m in LAW_METRICS}))
    if len({round(x, 6) for x, _, _ in points}) < 2:
        raise NotDrawn("the variants do not differ in p/(d·n)" if points else
                       "no run logged params_per_train_pixel")
    points.sort()
    fig, axes = plt.subplots(1, len(LAW_METRICS), figsize=(4.2 * len(LAW_METRICS), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], LAW_METRICS):
        xs = [x for x, _, _ in points]
        means = [st[metric][0] for _, _, st in points]
        lows = [st[metric][0] - st[metric][1] if math.isfinite(st[metric][1]) else 0 for _, _, st in points]
        highs = [st[metric][2] - st[metric][0] if math.isfinite(st[metric][2]) else 0 for _, _, st in points]
        ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3)
        for x, v, st in points:
            ax.annotate(v, (x, st[metric][0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("classifier parameters / (784 · n)")
        ax.set_ylabel(metric)
        if metric == "coverage_gap":
            ax.axhline(0, color="grey", lw=0.8, ls=":")
    return _save(fig, figures, "leakage_vs_params_per_pixel.png")


def reconstructions_figure(client, basis, variants, figures: Path) -> str | None:
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            runs = [r for r in basis.get(v, []) if "train_top10" in r.data.metrics]
            best = max(runs, key=lambda r: r.data.metrics["train_top10"], default=None)
            if best is None:
                continue
            path = _artifact(client, best.info.run_id, "reconstructions.png", Path(tmp) / f"{v}-r")
            if path:
                panels.append((v, best.data.metrics, plt.imread(path)))
    if not panels:
        raise NotDrawn("no run has a readable reconstructions.png (runs made before per-image leakage was "
                       "measured have none)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 4.3 * len(panels)), squeeze=False)
    for ax, (v, m, image) in zip(axes[:, 0], panels):
        ax.imshow(image)
        ax.set_title(f"{v}: train_coverage {m.get('train_coverage', float('nan')):.2f}, "
                     f"heldout_coverage {m.get('heldout_coverage', float('nan')):.2f}", fontsize=8)
        ax.axis("off")
    return _save(fig, figures, "reconstructions.png")
