"""`harness` command line: run one trial; sweeps, ablations and reports build on it."""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from pathlib import Path

from harness.config import ClusterError, ConfigError

EXIT_CONFIG = 2
EXIT_CLUSTER = 3
MAX_MESSAGE = 500  # an error message may quote the input: never more than this on its one line (the
# longest useful ones list the allowed keys or metric names: under 400)


def one_line(message: object, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_out(out: Path, flag: str = "--out") -> None:
    """The output folder exists as a folder or can be made: no file at it or on its way."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" (on the way to {out})"
                raise ConfigError(f"{flag}: {path}{where} is a file, not a folder; choose another {flag}")
            return


def check_sweep_args(sweep, args, out: Path, kind: str) -> None:
    """What `harness sweep` and `harness ablate` can get wrong on the command line or on this
    machine, checked before Ray starts and before anything is written."""
    from harness.records.mlflow_store import check_server, check_tracking_uri, sqlite_path
    from harness.sweep.files import check_local_machine

    check_out(out)
    ray_dir = out / "ray"
    if args.resume and not (ray_dir.is_dir() and any(ray_dir.iterdir())):
        raise ConfigError(f"--resume: {out} holds no {kind} to continue (nothing in {ray_dir}); drop --resume to "
                          "start one, or point --out at the interrupted run's folder")
    if args.mlflow_uri:
        check_tracking_uri(args.mlflow_uri)
        db = sqlite_path(args.mlflow_uri)
        if db is not None and not db.parent.is_dir() and db.parent.resolve() != out.resolve():
            raise ConfigError(f"--mlflow-uri: folder {db.parent} does not exist; create it, or leave --mlflow-uri "
                              "out to keep the store in OUT/mlflow.db")
    if not args.address or args.address == "local":  # a cluster's machines are known only once connected
        check_local_machine(sweep)
    if args.mlflow_uri:
        check_server(args.mlflow_uri)  # last: a server that does not answer is exit 3, not a wrong input


def check_claim_decidable(sweep, seeds: int, sweep_trials: bool = False) -> None:
    """A claim on a count (collapsed) is decided by a one-sided Fisher exact test at p < 0.05,
    whose smallest attainable p with S runs a side is 1 / C(2S, S): refuse seeds that cannot
    reach it (3 give exactly 0.05). `sweep_trials`: the runs are a sweep's trials per variant
    (budget.num_samples), not a study's confirmation seeds."""
    claim = sweep.claim
    if claim is None or claim.lesser is None:
        return
    from harness.report.verdicts import COUNTED
    from harness.records.results import FISHER_ALPHA, fisher_smallest_p

    if claim.metric not in COUNTED:
        return
    best = fisher_smallest_p(seeds, seeds)
    if best < FISHER_ALPHA:
        return
    need = next(s for s in itertools.count(seeds) if fisher_smallest_p(s, s) < FISHER_ALPHA)
    if sweep_trials:
        raise ConfigError(f"budget.num_samples: the claim on {claim.metric} (a count) is decided by Fisher's exact "
                          f"test at p < {FISHER_ALPHA:g}, but with {seeds} trials per variant the smallest attainable "
                          f"p is {best:.3g}; use at least {need} (smallest p {fisher_smallest_p(need, need):.3g}): "
                          f"--set budget.num_samples={need} or budget: {{num_samples: {need}}} in the file")
    raise ConfigError(f"--seeds: the claim on {claim.metric} (a count) is decided by Fisher's exact test at "
                      f"p < {FISHER_ALPHA:g}, but with {seeds} seeds per variant the smallest attainable p is "
                      f"{best:.3g}; use at least {need} seeds (smallest p {fisher_smallest_p(need, need):.3g}): "
                      f"--seeds {need} or confirm_seeds: {need} in the file")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, dotted (e.g. --set loss.kkt=1 --set classifier.pool=max)")


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: runs/<name>)")
    p.add_argument("--address", help="connect to a running Ray cluster (e.g. 10.0.0.1:6379 or auto); "
                   "without it a private local Ray instance is started")
    p.add_argument("--shared-storage", action="store_true",
                   help="with --address on a cluster of several nodes: --out and the classifier cache "
                   "(HARNESS_CACHE_DIR) are on storage every node mounts at the same path")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--smoke", action="store_true", help="tiny budget: 2 trials x 2 epochs x 3 steps")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db, whose artifact "
                   "paths are absolute; a server with proxied artifacts, `mlflow server --serve-artifacts "
                   "--artifacts-destination DIR`, gives a store that can be moved and shared)")


def format_table(rows: list[tuple[str, str]], headers=("metric", "value")) -> str:
    width = max(len(headers[0]), *(len(r[0]) for r in rows))
    lines = [f"| {headers[0]:<{width}} | {headers[1]} |", f"|{'-' * (width + 2)}|{'-' * (len(headers[1]) + 2)}|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def cmd_run(args) -> int:
    from harness.config import build_config, load_yaml

    from harness.config import check_data_root

    cfg = build_config(load_yaml(args.config) if args.config else {}, args.overrides)  # before heavy imports
    out = Path(args.out or f"runs/{cfg.name}")
    check_out(out)
    check_data_root(cfg.data)
    from tqdm import tqdm

    from harness.records.metric_names import METRIC_NAMES, REFERENCE_NAMES, SITUATIONAL_NAMES
    from harness.trial import Trial

    trial = Trial(cfg)  # data and classifiers load here: input errors surface before any output
    info = trial.classifier_info
    print(f"classifier {cfg.classifier.arch} depth {cfg.classifier.depth}"
          f"{' pool ' + cfg.classifier.pool if cfg.classifier.arch == 'cnn' else ''}: test acc {info['test_acc']:.4f} "
          f"({'cache hit' if info['cache_hit'] else 'trained'}, key {info['cache_key']}); "
          f"evaluator held-out acc {trial.evaluator_info['heldout_acc']:.4f}; "
          f"loss terms: {', '.join(f'{k}={v:g}' for k, v in trial.weights.items())}", flush=True)
    if "kkt_residual_train" in info:
        print(f"classifier training loss {info['train_loss']:.4g}, accuracy {info['train_acc']:.3f}, gradient norm "
              f"{info['grad_norm']:.3g}; stationarity (fitted KKT residual): training images "
              f"{info['kkt_residual_train']:.3f}, as many held-out images {info['kkt_residual_heldout']:.3f}", flush=True)
    bar = tqdm(total=cfg.train.epochs, desc=cfg.inverter, unit="epoch", file=sys.stderr,
               disable=args.quiet)
    while not trial.done:
        row = trial.step()
        bar.set_postfix(loss=f"{row['loss']:.3f}", nn_ssim=f"{row['ssim_nn_train_mean']:.3f}",
                        div=f"{row['diversity']:.3f}", score=f"{row['score']:.3f}",
                        cov=f"{row['train_coverage']:.2f}/{row['heldout_coverage']:.2f}")
        bar.update(1)
    bar.close()
    paths = trial.write_outputs(out)
    final = trial.final_metrics()
    print(format_table([(k, f"{final[k]:.4f}") for k in (*METRIC_NAMES, *SITUATIONAL_NAMES, *REFERENCE_NAMES)
                        if k in final]))
    print(f"outputs in {out}/: {', '.join(p.name for p in paths.values())}")
    if final.get("nonfinite"):
        print(f"error: the loss became NaN/inf at epoch {int(final['epoch'])}; training stopped "
              "(lower train.lr or the loss weights)", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    from harness.sweep.files import load_sweep

    sweep = load_sweep(args.file, args.overrides, smoke=args.smoke)  # validated before Ray starts
    out = Path(args.out or f"runs/{sweep.name}")
    if not args.smoke:  # --smoke checks a file end to end at 2 trials a variant: it decides no claim
        check_claim_decidable(sweep, sweep.budget.num_samples, sweep_trials=True)
    check_sweep_args(sweep, args, out, "sweep")
    from harness.sweep.tune import best_rows, run_sweep, summary_table

    variants = sweep.variants()
    print(f"sweep {sweep.name}: {len(variants)} variant(s) x {sweep.budget.num_samples} trials, "
          f"metric {sweep.metric} ({sweep.mode}), ASHA {'on' if sweep.asha.enabled else 'off'}; output {out}/",
          flush=True)
    outcomes = run_sweep(sweep, out, address=args.address, resume=args.resume, mlflow_uri=args.mlflow_uri,
                         shared_storage=args.shared_storage)
    print(summary_table(best_rows(outcomes, sweep.metric, sweep.mode), sweep.metric))
    from harness.sweep.tracking import how_to_view

    total = sum(len(o.rows) for o in outcomes)
    errors = sum(o.errors for o in outcomes)
    uri = args.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    print(f"{total} trials ({errors} failed).")
    print(how_to_view(uri, sweep.name, out))
    return 0


def cmd_ablate(args) -> int:
    from harness.sweep.files import load_sweep

    sweep = load_sweep(args.file, args.overrides, smoke=args.smoke)
    out = Path(args.out or f"runs/{sweep.name}")
    n_seeds = sweep.confirm_seeds if args.seeds is None else args.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds: {n_seeds}; give at least 1 confirmation seed")
    against_value = sweep.claim is not None and (sweep.claim.above is not None or sweep.claim.reference is not None)
    if len(sweep.variants()) < 2 and not (against_value and sweep.variants()):
        field = "variants" if sweep.named_variants is not None else "axes"
        raise ConfigError(f"{field}: {sweep.name} has {'no axes' if field == 'axes' and not sweep.axes else 'one variant'}, "
                          f"so a study has nothing to compare; use `harness sweep` for one configuration, add {field}, "
                          "or give a claim against a value (claim.above) or a reference point (claim.reference)")
    check_claim_decidable(sweep, n_seeds)
    from harness.sweep.files import check_one_regime

    check_one_regime(sweep)
    check_sweep_args(sweep, args, out, "study")
    from harness.sweep.study import run_ablation
    from harness.sweep.tune import best_rows, summary_table

    seeds = sweep.confirmation_seeds(n_seeds)
    print(f"study {sweep.name}: {len(sweep.variants())} variant(s), each tuned with {sweep.budget.num_samples} "
          f"trials, then confirmed over seeds {seeds} (disjoint from the tuning seeds); output {out}/", flush=True)
    outcomes = run_ablation(sweep, out, seeds, address=args.address, resume=args.resume, mlflow_uri=args.mlflow_uri,
                            shared_storage=args.shared_storage)
    confirmed = [phases["confirm"] for phases in outcomes.values() if "confirm" in phases]
    print(summary_table(best_rows(confirmed, sweep.metric, sweep.mode, top=len(seeds)), sweep.metric))
    from harness.sweep.tracking import how_to_view

    uri = args.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    print(how_to_view(uri, sweep.name, out))
    print(f"Report: harness report --experiment {sweep.name} --mlflow-uri {uri}")
    return 0


def cmd_compare(args) -> int:
    from harness.records.mlflow_store import require_store

    require_store(args.mlflow_uri)  # reading never creates a store
    from harness.report.figures import compare_runs

    print(compare_runs(args.run_ids, args.mlflow_uri))
    return 0


def cmd_report(args) -> int:
    from harness.records.mlflow_store import require_store

    require_store(args.mlflow_uri)  # reading never creates a store
    if args.out:
        check_out(Path(args.out))
    from harness.report.write import write_report

    path = write_report(args.experiment, args.mlflow_uri, Path(args.out) if args.out else None)
    print(f"report written to {path}")
    return 0


def cmd_index(args) -> int:
    from harness.report.index import write_index

    readme = Path(args.readme)
    if not readme.parent.is_dir():
        raise ConfigError(f"--readme: folder {readme.parent} does not exist; point it at reports/README.md")
    if args.check:
        if write_index(readme, check=True):
            print(f"{readme}: the index is current")
            return 0
        print(f"{readme}: the index is out of date; run `harness index`", file=sys.stderr)
        return 1
    write_index(readme)
    print(f"index written to {readme}")
    return 0


def cmd_help_config(_args) -> int:
    from harness.config import describe_fields

    for name, default, doc in describe_fields():
        print(f"{name:<38} {default:<14} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="one trial: pretrain/reuse the classifier, invert it, write metrics and images")
    p.add_argument("--config", help="YAML file with the settings that differ from the defaults")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: runs/<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna + ASHA over a search_spaces/*.yaml file, tracked in MLflow")
    p.add_argument("file", help="sweep file (search_spaces/*.yaml)")
    _add_sweep_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ablate", help="per-variant tuning with equal budgets, then the best weights over seeds")
    p.add_argument("file", help="sweep file with axes (search_spaces/*.yaml)")
    _add_sweep_args(p)
    p.add_argument("--seeds", type=int, help="confirmation seeds per variant (default: the file's confirm_seeds, "
                   "3 unless it says otherwise; they start at 1000, or after the largest tuning seed, so none "
                   "repeats a tuning trial)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="tables and figures of a study, read from MLflow")
    p.add_argument("--experiment", required=True, help="MLflow experiment (= the study's name)")
    p.add_argument("--mlflow-uri", required=True, help="tracking URI, e.g. sqlite:///runs/pooling/mlflow.db")
    p.add_argument("--out", help="output folder (default: reports/<experiment>)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="side-by-side configs and metrics of MLflow runs")
    p.add_argument("run_ids", nargs="+", help="MLflow run ids")
    p.add_argument("--mlflow-uri", required=True, help="tracking URI")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("index", help="regenerate the index of reports/README.md from the reports' own verdicts")
    p.add_argument("--readme", default="reports/README.md", help="the index file; its folder holds one folder per report")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the index is out of date")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("config", help="print every setting with its default and documentation")
    p.set_defaults(func=cmd_help_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except ClusterError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_CLUSTER
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
