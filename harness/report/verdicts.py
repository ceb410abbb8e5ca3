"""The rules a study report decides by: which runs are averaged, the claim's verdict (intervals
that separate, or Fisher's exact test for a count), the reading of the class-level control, and
where each variant sits among its reference points. Pure functions of numbers and run records
(no MLflow client, no matplotlib); `harness.report.sections` only words and lays them out."""
from __future__ import annotations

import math

from harness.records.results import (FISHER_ALPHA, TAG_OUTCOME, MeanCI, enters_averages, enters_counts, fisher_greater,
                             fisher_smallest_p)

COUNTED = ("collapsed",)  # 0/1 per run: a count ("1 of 3") reads better than a t-interval
PER_IMAGE_METRICS = ("train_coverage", "heldout_coverage", "coverage_gap", "train_top10", "heldout_top10",
                     "top10_gap")


def exclusion(run) -> str:
    """Why an MLflow run is left out of the averages ("" when it is averaged): `enters_averages`."""
    return enters_averages(run.info.status, run.data.metrics)[1]


def averaged_runs(runs: list) -> list:
    """The runs every mean, interval, count and verdict of a report is taken over."""
    return [r for r in runs if enters_averages(r.info.status, r.data.metrics)[0]]


def counted_runs(runs: list) -> list:
    """The runs a count of a 0/1 metric (`COUNTED`) is taken over: the averaged runs and the runs
    the collapse stopper ended (`enters_counts`)."""
    return [r for r in runs if enters_counts(r.info.status, r.data.metrics, r.data.tags.get(TAG_OUTCOME))]


def interval_text(stat: MeanCI) -> str:
    """'mean ± 95% half-width', the mean alone for one value, n/a for none."""
    if not math.isfinite(stat.mean):
        return "n/a"
    if not (math.isfinite(stat.low) and math.isfinite(stat.high)):
        return f"{stat.mean:.3f}"
    return f"{stat.mean:.3f} ± {(stat.high - stat.low) / 2:.3f}"


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
    if not g.n:
        return f"**inconclusive**: {statement}: {_none_averaged(greater, metric)}"
    if lesser and lesser != "None":
        if lesser not in stats or metric not in stats[lesser]:
            return f"**inconclusive**: {statement}: variant {lesser} has no confirmed runs."
        l_ = stats[lesser][metric]
        if not l_.n:
            return f"**inconclusive**: {statement}: {_none_averaged(lesser, metric)}"
        if metric in COUNTED:
            return count_verdict(statement, metric, greater, g, lesser, l_)
        numbers = (f"{metric}: {greater} {interval_text(g)} (n={g.n}) vs {lesser} {interval_text(l_)} (n={l_.n}) "
                   "(mean ± 95% CI half-width over seeds)")
        if g.low > l_.high:
            return f"**supported**: {statement}. {numbers}; the intervals separate."
        if l_.low > g.high:
            return f"**not supported** (the opposite holds): {statement}. {numbers}; the intervals separate the other way."
        return f"**inconclusive**: {statement}. {numbers}; the intervals overlap."
    ref_value = refs.get(greater, {}).get(reference, float("nan"))
    numbers = f"{metric} of {greater}: {interval_text(g)} (n={g.n}) vs its {reference} = {ref_value:.3f}"
    if not math.isfinite(ref_value):
        return f"**inconclusive**: {statement}: variant {greater} has no {reference} value."
    if g.low > ref_value:
        return f"**supported**: {statement}. {numbers}; the interval lies above the reference."
    if g.high < ref_value:
        return f"**not supported**: {statement}. {numbers}; the interval lies below the reference."
    return f"**inconclusive**: {statement}. {numbers}; the interval contains the reference."


def _none_averaged(variant: str, metric: str) -> str:
    return (f"no run of variant {variant} was averaged on {metric} (none ended normally with a finite "
            "loss and a recorded value; see Per seed for why each was left out).")


def count_verdict(statement: str, metric: str, greater: str, g: MeanCI, lesser: str, l_: MeanCI) -> str:
    """A claim on a 0/1 metric (collapsed) compares counts of runs, by Fisher's exact test (one-sided,
    5%): a t-interval over 0/1 values has zero width at 0 of 3 and 3 of 3 and would call any
    difference significant. The smallest p the runs could give is stated: at 3 runs a side it is
    0.05 itself, and no count could support the claim."""
    if not (g.n and l_.n):
        return f"**inconclusive**: {statement}: {metric} was not recorded for {greater if not g.n else lesser}."
    kg, kl = round(g.mean * g.n), round(l_.mean * l_.n)
    p, p_reverse = fisher_greater(kg, g.n, kl, l_.n), fisher_greater(kl, l_.n, kg, g.n)
    smallest = fisher_smallest_p(g.n, l_.n)  # the same either way round
    numbers = (f"{metric}: {greater} {kg} of {g.n} vs {lesser} {kl} of {l_.n} (Fisher's exact test, one-sided "
               f"p = {p:.3f}; the reverse p = {p_reverse:.3f}; smallest attainable one-sided p with {g.n} and "
               f"{l_.n} runs: {smallest:.3f})")
    if p < FISHER_ALPHA:
        return f"**supported**: {statement}. {numbers}; the counts separate at p < 0.05."
    if p_reverse < FISHER_ALPHA:
        return f"**not supported** (the opposite holds): {statement}. {numbers}; the counts separate the other way."
    if smallest >= FISHER_ALPHA:
        return (f"**inconclusive**: {statement}. {numbers}; the counts do not separate at p < 0.05, and no counts "
                "of this many runs could: it takes more seeds.")
    return f"**inconclusive**: {statement}. {numbers}; the counts do not separate at p < 0.05."


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
