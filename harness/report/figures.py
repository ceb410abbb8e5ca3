"""The figures of a study report, each drawn from the runs' metrics and artifacts in MLflow (a
figure that cannot be drawn says why, in the report), and `harness compare`. The reconstruction
figures show each variant's median-seed run, never its luckiest one."""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harness.config import ConfigError  # noqa: E402
from harness.records.mlflow_store import TAG_OPTUNA_STORAGE, client_for  # noqa: E402
from harness.report.sections import join, run_seeds  # noqa: E402
from harness.records.results import is_finite_number, mean_ci  # noqa: E402
from harness.report.verdicts import COUNTED, counted_runs  # noqa: E402

LAW_METRICS = ("coverage_gap", "train_top10", "heldout_top10")


class NotDrawn(Exception):
    """A figure the report promises could not be made; the message says why (it goes in the report)."""


def _artifact(client, run_id: str, name: str, into: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, name, str(into)))
    except Exception:
        return None


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


def unreadable_section(client: ReadingClient, runs: list) -> list[str]:
    """The artifacts the figures could not read, and why (most often a store moved elsewhere)."""
    if not client.unreadable:
        return []
    names = {r.info.run_id: r.info.run_name or r.info.run_id for r in runs}
    return ["## Artifacts that could not be read", "", "The figures above leave these out:", "",
            "| run | artifact | why |", "|---|---|---|",
            *(f"| {names.get(run_id, run_id)} | {name} | {why} |" for run_id, name, why in client.unreadable), ""]


def _save(fig, figures: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(figures / name, dpi=110)
    plt.close(fig)
    return name


@dataclass(frozen=True)
class MedianRun:
    """The run a one-run figure shows for a variant: of its `n` runs with a finite value of the
    metric, the one nearest their median `median`. With an odd count that run is the median; with an
    even count the median lies halfway between the two middle runs, both equally near it: the lower
    one is shown and `other` is the upper, unless the two have the same value (then it is the median)."""
    run: object
    n: int
    median: float
    other: object | None = None

    def label(self, metric: str) -> str:
        """'seed S (metric v, the median of n)', or for an even count which middle run this is."""
        value = self.run.data.metrics[metric]
        head = f"seed {join(run_seeds([self.run]))} ({metric} {value:.3f}"
        if self.other is None:
            return f"{head}, the median of {self.n})"
        return (f"{head}, the lower middle of {self.n}: their median {self.median:.3f} lies halfway between it and "
                f"seed {join(run_seeds([self.other]))} at {self.other.data.metrics[metric]:.3f})")


def median_run(runs: list, metric: str) -> MedianRun | None:
    """The run of `runs` nearest the median of `metric` over those with a finite value (`MedianRun`),
    None if none has one; ties in input order. A figure of one run shows the median seed, so that it
    is what a typical seed gives, not the best of several tries."""
    ranked = sorted((r for r in runs if is_finite_number(r.data.metrics.get(metric))),
                    key=lambda r: r.data.metrics[metric])
    if not ranked:
        return None
    n = len(ranked)
    lower, upper = ranked[(n - 1) // 2], ranked[n // 2]
    low, high = lower.data.metrics[metric], upper.data.metrics[metric]
    return MedianRun(lower, n, (low + high) / 2, upper if high != low else None)


def shown_runs(basis: dict[str, list], variants: list[str], metric: str) -> dict[str, MedianRun]:
    """Each variant's median run by `metric` (`median_run`), for the variants that have one."""
    chosen = {v: median_run(basis.get(v, []), metric) for v in variants}
    return {v: shown for v, shown in chosen.items() if shown is not None}


def shown_caption(shown: dict[str, MedianRun], metric: str) -> str:
    """Which run a figure shows for each variant, and where it lies against the median of how many."""
    return (f"Each variant is shown by its median run by {metric} among the runs it averages: " +
            "; ".join(f"{v} {s.label(metric)}" for v, s in shown.items()) + ".")


def figure_metric(params: dict) -> str:
    """The metric a one-run figure picks its median run by: the claim's, unless the claim counts a
    0/1 outcome (collapsed: any run of the majority is a 'median'), then the study's search metric."""
    claim = params.get("claim.metric")
    if claim and claim != "None" and claim not in COUNTED:
        return claim
    study = params.get("metric")
    return study if study and study != "None" and study not in COUNTED else "score"


def figures_section(client, parent, params: dict, tuned: dict[str, list], confirmed: dict[str, list],
                    basis: dict[str, list], variants: list[str], figures: Path) -> list[str]:
    """Every figure under its title, or why it could not be drawn. The figures of one run per
    variant show its median run by the claim's metric (else the study's)."""
    metric = figure_metric(params)
    shown = shown_runs(basis, variants, metric)
    lines = ["## Figures", ""]
    for title, make in (("Median-seed inversion of each variant (top: its generator's or candidate bank's images) and "
                         "their nearest training images (bottom)",
                         lambda: grids_figure(client, shown, figures, metric)),
                        ("Sorted per-training-image best SSIM (Haim et al.'s view)",
                         lambda: coverage_figure(client, basis, variants, figures)),
                        ("Leakage against parameters per training pixel, p/(d·n) (mean ± 95% CI over runs)",
                         lambda: law_figure(basis, variants, figures)),
                        ("Best training and held-out reconstructions of each variant's median-seed run",
                         lambda: reconstructions_figure(client, shown, figures, metric)),
                        ("Score vs epoch of every tuning trial (dashed: stopped early)",
                         lambda: score_curves_figure(client, tuned, variants, figures)),
                        ("Collapse rate per variant",
                         lambda: collapse_figure(tuned, confirmed, variants, figures)),
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
    return lines


def _read_shown(client, shown: dict[str, MedianRun], names: tuple[str, ...], metric: str) -> list:
    """(variant, MedianRun, images) for each shown run whose artifacts `names` can all be read."""
    if not shown:
        raise NotDrawn(f"no averaged run has a finite {metric} to find its median by")
    read = []
    with tempfile.TemporaryDirectory() as tmp:
        for v, s in shown.items():
            paths = [_artifact(client, s.run.info.run_id, name, Path(tmp) / f"{v}-{name}") for name in names]
            if all(paths):
                read.append((v, s, [plt.imread(path) for path in paths]))
    return read


def grids_figure(client, shown: dict[str, MedianRun], figures: Path, metric: str) -> tuple[str, str]:
    def title(v, s):
        value = s.run.data.metrics[metric]
        where = f"median of {s.n}" if s.other is None else f"lower middle of {s.n}, median {s.median:.3f}"
        return f"{v}, seed {join(run_seeds([s.run]))} ({metric} {value:.3f}, {where})"
    panels = [(title(v, s), grid, near)
              for v, s, (grid, near) in _read_shown(client, shown, ("grid.png", "nearest.png"), metric)]
    if not panels:
        raise NotDrawn("no variant's median run has a readable grid.png and nearest.png "
                       "(see the artifacts that could not be read, below)")
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 8.5), squeeze=False)
    for j, (title, grid, near) in enumerate(panels):
        axes[0, j].imshow(grid)
        axes[0, j].set_title(title, fontsize=9)
        axes[1, j].imshow(near)
        for ax in axes[:, j]:
            ax.axis("off")
    return _save(fig, figures, "grids.png"), shown_caption(shown, metric)


def coverage_bars(basis) -> list[float]:
    """The SSIM bars the runs counted coverage at (eval.recon_threshold, eval.strict_threshold), as
    they were logged; the defaults for runs from before a bar existed."""
    bars = set()
    for runs in basis.values():
        for run in runs:
            for key, default in (("eval.recon_threshold", 0.4), ("eval.strict_threshold", 0.5)):
                try:
                    bars.add(float(run.data.params.get(key, default)))
                except ValueError:
                    pass
    return sorted(bars) or [0.4, 0.5]


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
    for bar, style in zip(coverage_bars(basis), (":", "--")):
        ax.axhline(bar, color="grey", ls=style, lw=1, label=f"coverage bar {bar:g}")
    ax.set_xlabel("training images, sorted")
    ax.set_ylabel("best SSIM of any generated image")
    ax.legend(fontsize=8)
    return _save(fig, figures, "per_train_best_ssim.png")


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


def reconstructions_figure(client, shown: dict[str, MedianRun], figures: Path, metric: str) -> tuple[str, str]:
    panels = [(f"{v}, seed {join(run_seeds([s.run]))}", s.run.data.metrics, image)
              for v, s, (image,) in _read_shown(client, shown, ("reconstructions.png",), metric)]
    if not panels:
        raise NotDrawn("no variant's median run has a readable reconstructions.png (runs made before per-image "
                       "leakage was measured have none)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 4.3 * len(panels)), squeeze=False)
    for ax, (title, m, image) in zip(axes[:, 0], panels):
        ax.imshow(image)
        ax.set_title(f"{title}: train_coverage {m.get('train_coverage', float('nan')):.2f}, "
                     f"heldout_coverage {m.get('heldout_coverage', float('nan')):.2f}", fontsize=8)
        ax.axis("off")
    return _save(fig, figures, "reconstructions.png"), shown_caption(shown, metric)


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
    """The share of runs collapsed at their end, over the runs a count takes (`counted_runs`: those
    averaged and those the collapse stopper ended; not failed, pruned or NaN runs)."""
    def rate(runs):
        vals = [r.data.metrics.get("collapsed") for r in counted_runs(runs) if "collapsed" in r.data.metrics]
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

    from harness.records.optuna_study import complete_trials

    if not any(k.startswith("search.") for k in params):
        raise NotDrawn("this study searched no setting (its file has no `search`): there is no importance to draw")
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
