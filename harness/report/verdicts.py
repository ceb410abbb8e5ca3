"""The rules a study report decides by: which runs are averaged, the claim's verdict (the 95%
interval of the difference between the variants, paired by seed where they share seeds, else
Welch's; TOST for a claim of no difference; Fisher's exact test for a count), the reading of the
class-level control, and where each variant sits among its reference points. Pure functions of
numbers and run records (no MLflow client, no matplotlib); `harness.report.sections` only words and
lays them out."""
from __future__ import annotations

import math

from harness.records.differences import (EXACT_SIGN_FLIPS, MIN_PAIRS, PAIRED, SIGN_FLIP_SAMPLES, Difference, compare,
                                         difference_kind, equivalence, equivalence_kind, min_paired_seeds,
                                         seeds_for_power)
from harness.records.results import (FISHER_ALPHA, TAG_OUTCOME, MeanCI, enters_averages, enters_counts, fisher_greater,
                             fisher_smallest_p, is_finite_number)

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


SeedValues = list[tuple[int | None, float]]  # one variant's (seed, value) per averaged run


def seed_values(runs: list, metric: str) -> SeedValues:
    """(seed, value) of each run with a finite `metric`, the seed from the run's "seed" param (None
    where it has none): what a claim's difference is taken over (`claim_verdict`)."""
    out = []
    for r in runs:
        value = r.data.metrics.get(metric)
        if not is_finite_number(value):
            continue
        try:
            seed = int(float(r.data.params["seed"]))
        except (KeyError, ValueError, TypeError):
            seed = None
        out.append((seed, float(value)))
    return out


def claim_values(runs: dict[str, list], params: dict) -> dict[str, SeedValues]:
    """Each variant's (seed, value) pairs of the claim's metric over `runs` (the averaged runs)."""
    metric = params.get("claim.metric")
    if not metric or metric == "None" or metric in COUNTED:
        return {}
    return {v: seed_values(rs, metric) for v, rs in runs.items()}


def claim_verdict(params: dict, stats: dict[str, dict[str, MeanCI]], refs: dict[str, dict[str, float]],
                  values: dict[str, SeedValues]) -> str:
    """supported / not supported / inconclusive for the study's claim, with the numbers. Two
    variants: by the 95% interval of greater - lesser over `values` (each variant's (seed, value)
    per averaged run, `claim_values`), paired by seed where they share at least `MIN_PAIRS` seeds,
    else Welch's (`harness.records.differences.compare`); with a `claim.margin`, an equivalence
    claim by TOST; a count (`COUNTED`) by Fisher's exact test on `stats`. Or a variant against its
    own reference point (`refs[variant][name]`) by whether its interval lies above or below it. Or a
    variant above a value (`claim.above`): the paired rule on (value − above) at each seed, i.e. the
    one-sample t-interval and sign-flip p (for coverage_gap and above 0: the training images against
    their disjoint held-out control, paired within each run)."""
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
        return difference_verdict(statement, numbers, greater, values.get(greater, []), lesser,
                                  values.get(lesser, []), _margin(params))
    above = _number(params, "claim.above")
    if above is not None:
        numbers = (f"{metric}: {greater} {interval_text(g)} (n={g.n}) vs value {above:.3f} "
                   "(mean ± 95% CI half-width over seeds)")
        g_values = values.get(greater, [])
        return difference_verdict(statement, numbers, greater, g_values, f"{above:g}", [(s, above) for s, _ in g_values])
    ref_value = refs.get(greater, {}).get(reference, float("nan"))
    numbers = f"{metric} of {greater}: {interval_text(g)} (n={g.n}) vs its {reference} = {ref_value:.3f}"
    if not math.isfinite(ref_value):
        return f"**inconclusive**: {statement}: variant {greater} has no {reference} value."
    if g.low > ref_value:
        return f"**supported**: {statement}. {numbers}; the interval lies above the reference."
    if g.high < ref_value:
        return f"**not supported**: {statement}. {numbers}; the interval lies below the reference."
    return f"**inconclusive**: {statement}. {numbers}; the interval contains the reference."


def comparisons(params: dict, values: dict[str, SeedValues]) -> list[str]:
    """How each variant the verdict leaves out compares with the claim's `greater` on its metric:
    every other variant where the claim is against a value (`claim.above`), every variant but the
    two of the claim where it is against `lesser` (a leave-one-out study's other removals). The
    paired difference (Welch where the seeds differ) with its interval and p, as a comparison,
    with no verdict attached; none where the claim is against a reference point."""
    metric, greater = params.get("claim.metric"), params.get("claim.greater")
    lesser = params.get("claim.lesser")
    lesser = None if lesser in (None, "", "None") else lesser
    if greater not in values or (_number(params, "claim.above") is None and lesser is None):
        return []
    lines = []
    for other in sorted(v for v in values if v not in (greater, lesser)):
        diff = compare(values[other], values[greater])
        if diff is None:
            continue
        lines.append(f"Compared (no claim): {metric} {other} against {greater}, "
                     + _difference_text(diff, other, greater, (len(values[other]), len(values[greater])), power=False)
                     + ".")
    return lines


def _none_averaged(variant: str, metric: str) -> str:
    return (f"no run of variant {variant} was averaged on {metric} (none ended normally with a finite "
            "loss and a recorded value; see Per seed for why each was left out).")


def _number(params: dict, key: str) -> float | None:
    """A numeric claim setting from the runs' params, None where it is not set."""
    value = params.get(key)
    if value in (None, "", "None"):
        return None
    return float(value)


def _margin(params: dict) -> float | None:
    """The equivalence margin of the claim (`claim.margin`), None for a claim of a difference."""
    return _number(params, "claim.margin")


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _difference_text(diff: Difference, greater: str, lesser: str, runs: tuple[int, int], power: bool = True) -> str:
    """The difference's numbers in words: effect, 95% interval, p, n, which test, and (`power`) the
    seeds 80% power would take at the observed effect and spread."""
    low, high = float(diff.low), float(diff.high)
    if diff.test == PAIRED:
        n = diff.n1
        left = sum(runs) - 2 * n
        text = (f"difference {greater} − {lesser} paired by seed over {n} seeds both ran"
                + (f" ({left} run{'s' if left > 1 else ''} without a partner left out)" if left else "")
                + f": mean {float(diff.effect):.3f}, 95% CI [{low:.3f}, {high:.3f}] (Student t, {diff.df} df); "
                f"sign-flip permutation p = {_p(float(diff.p))} ")
        text += (f"(exact, all {2 ** n} sign patterns; the smallest attainable with {n} pairs is {_p(2 / 2 ** n)})"
                 if n <= EXACT_SIGN_FLIPS else f"({SIGN_FLIP_SAMPLES:,} random sign patterns, fixed seed)")
        spread, unit = f"sd of the differences {float(diff.sd):.3f}", "paired seeds"
    else:
        text = (f"difference of means {greater} − {lesser}, unpaired (Welch's t; fewer than {MIN_PAIRS} seeds ran "
                f"once on both sides): {float(diff.effect):.3f}, 95% CI [{low:.3f}, {high:.3f}] (Welch, "
                f"{float(diff.df):.1f} df); Welch p = {_p(float(diff.p))}; n = {diff.n1} and {diff.n2} runs")
        spread, unit = f"pooled sd {float(diff.sd):.3f}", "seeds per variant"
    if bool(diff.flat):
        text += "; the spread is zero, so the interval has no width and the permutation p alone decides"
    if power:
        need = seeds_for_power(diff)
        text += (f"; 80% power at this effect and spread ({spread}) takes about {need} {unit}" if math.isfinite(need)
                 else "; no effect was observed, so no number of seeds for 80% power can be given")
    return text


def difference_verdict(statement: str, numbers: str, greater: str, g_values: SeedValues, lesser: str,
                       l_values: SeedValues, margin: float | None = None) -> str:
    """The verdict on "greater > lesser" (or, with a `margin`, on "|greater - lesser| < margin") from
    each variant's (seed, value) pairs; `numbers` (each variant's own mean ± CI) opens the line."""
    diff = compare(g_values, l_values)
    if diff is None:
        return (f"**inconclusive**: {statement}. {numbers}; a difference needs at least 2 runs of each variant "
                f"(or {MIN_PAIRS} seeds that both ran).")
    runs = (len(g_values), len(l_values))
    if margin is not None:
        eq = equivalence(diff, margin)
        kind = str(equivalence_kind(eq))
        how = (f"claim of no difference, |{greater} − {lesser}| < margin {margin:g}: TOST p = {_p(float(eq.p))} (the "
               f"larger of the two one-sided p's), 90% CI of the difference [{float(eq.low):.3f}, {float(eq.high):.3f}]; "
               + _difference_text(diff, greater, lesser, runs, power=False))
        why = {"supported": f"The 90% interval lies within ±{margin:g} (both one-sided p < 0.05).",
               "not supported": f"The 95% interval lies wholly outside ±{margin:g}: the difference exceeds the margin.",
               "inconclusive": f"The 90% interval is not within ±{margin:g}, nor the 95% interval wholly outside it: "
                               "neither equivalence nor a difference beyond the margin is shown."}[kind]
        return f"**{kind}**: {statement}. {numbers}; {how}. {why}"
    kind = str(difference_kind(diff))
    how = _difference_text(diff, greater, lesser, runs)
    p_name = "sign-flip p" if diff.test == PAIRED else "p"
    if kind == "supported":
        why = f"The interval of the difference lies above 0 and the {p_name} is below 0.05."
    elif kind == "not supported":
        why = f"The interval of the difference lies below 0 and the {p_name} is below 0.05."
    elif float(diff.low) > 0 or float(diff.high) < 0:
        why = (f"The interval of the difference excludes 0, but the {p_name} ({_p(float(diff.p))}) is not below 0.05: "
               + (f"with {diff.n1} pairs the smallest attainable is {_p(2 / 2 ** diff.n1)}, so it takes at least "
                  f"{min_paired_seeds()} seeds." if diff.test == PAIRED else "the test that needs no normality disagrees."))
    else:
        why = "The interval of the difference contains 0."
    opening = "**not supported** (the opposite holds)" if kind == "not supported" else f"**{kind}**"
    return f"{opening}: {statement}. {numbers}; {how}. {why}"


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


REGIME_PREFIXES = ("classifier.", "data.")  # settings that decide which classifier a variant inverts


def design_notes(params: dict, runs_by_variant: dict[str, list]) -> list[str]:
    """What the study's design lets its verdict say, beside it: a setting that decides the classifier
    searched per variant (a confound: the variants differ in it too, with the values the confirmation
    runs used), and per-variant tuning too small for TPE to act (fewer than 8 trials, or fewer than 4
    drawn by TPE after its random start-up ones)."""
    searched = [k.removeprefix("search.").removesuffix(".dist") for k in params
                if k.startswith("search.") and k.endswith(".dist")]
    notes = []
    confounded = [k for k in searched if k.startswith(REGIME_PREFIXES)]
    if confounded:
        values = "; ".join(
            f"{k}: " + ", ".join(f"{v} {'/'.join(sorted({_short_value(r.data.params.get(k)) for r in runs}))}"
                                 for v, runs in sorted(runs_by_variant.items()))
            for k in confounded)
        notes.append(f"**Confound:** the search tuned {', '.join(confounded)} per variant, so the variants' "
                     f"classifiers differ in it as well as in what the claim names ({values}). The verdict speaks "
                     "for the pair of tuned configurations, not for the claim's factor alone.")
    if searched:
        trials = int(float(params.get("budget.num_samples", 0) or 0))
        startup = int(float(params.get("tpe_startup_trials", 10) or 10))
        modelled = max(0, trials - startup)
        if trials < 8 or modelled < 4:
            notes.append(f"**Tuning:** {trials} trials per variant, {min(startup, trials)} of them random start-up "
                         f"and {modelled} drawn by TPE: below the 8 trials and 4 model-based draws TPE needs to act, "
                         "so the tuning reached no plateau and each variant's settings are close to a random choice.")
    return notes


def _short_value(value) -> str:
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)
