"""`harness report`: read a study from MLflow (runs, metric histories, artifacts) and turn it into
reports/<study>/README.md with PNG figures that test the study's claim. The rules it decides by
are `harness.report.verdicts`; the Markdown sections `harness.report.sections`; the figures (and
`harness compare`) `harness.report.figures`."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from harness.config import ConfigError
from harness.records.mlflow_store import TAG_PHASE, TAG_VARIANT, child_runs, client_for, newest_parent
from harness.report.figures import ReadingClient, figures_section, unreadable_section
from harness.report.sections import (control_section, per_seed_section, reference_points, seeds_section,
                                     table_metrics, tuning_section, variants_section)
from harness.records.results import mean_ci
from harness.report.verdicts import (COUNTED, averaged_runs, claim_values, claim_verdict, comparisons, counted_runs,
                                     design_notes, yardstick)


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
    # every mean, count and verdict is taken over these: the confirmation runs (without a
    # confirmation phase, the tuning trials) that ended normally with a finite loss
    basis = {v: averaged_runs(runs) for v, runs in (confirmed or tuned).items()}
    variants = sorted(set(tuned) | set(confirmed))
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)

    metrics = table_metrics(params)
    # a count (collapsed) also takes the runs the collapse stopper ended: their collapse is the outcome counted
    counted = {v: counted_runs(runs) for v, runs in (confirmed or tuned).items()}
    stats = {v: {m: mean_ci(r.data.metrics.get(m) for r in (counted if m in COUNTED else basis).get(v, []))
                 for m in metrics} for v in variants}
    # the reference points of the runs that are averaged: confirmation seeds that draw their own
    # training subsets have reference points of their own, which tuning runs (subset 0) must not blend in
    refs = reference_points([r for runs in basis.values() for r in runs]
                            or [r for r in children if r.data.tags.get(TAG_PHASE) != "control"])
    values = claim_values(basis, params)  # each variant's (seed, value) of the claim's metric: the difference
    lines = [f"# Study `{experiment}`", "", params.get("description", ""), ""]
    command = parent.data.tags.get("harness.command")
    if command:
        lines += ["Made with:", "", "```bash", command, f"harness report --experiment {experiment} --mlflow-uri {uri}",
                  "```", ""]
    lines += ["## Verdict", "", claim_verdict(params, stats, refs, values), ""]
    lines += [line for note in [*comparisons(params, values), *design_notes(params, basis)] for line in (note, "")]
    lines += [yardstick(stats, refs, params.get("claim.metric")), ""]
    lines += seeds_section(tuned, confirmed)
    lines += variants_section(basis, stats, refs, variants, bool(confirmed), None if confirmed else tuned)
    if confirmed:
        lines += per_seed_section(confirmed, refs, params.get("claim.metric"))
    lines += control_section(params, stats, by_phase.get("control", {}), refs, values)
    lines += tuning_section(tuned, params)
    lines += figures_section(client, parent, params, tuned, confirmed, basis, variants, figures)
    lines += unreadable_section(client, [parent, *children])
    report = out / "README.md"
    report.write_text("\n".join(lines))
    return report
