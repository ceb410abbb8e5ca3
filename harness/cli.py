"""`harness` command line: run one trial; sweeps, ablations and reports build on it."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from harness.config import ClusterError, ConfigError

EXIT_CONFIG = 2
EXIT_CLUSTER = 3


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

    cfg = build_config(load_yaml(args.config) if args.config else {}, args.overrides)  # before heavy imports
    from tqdm import tqdm

    from harness.metric_names import METRIC_NAMES, REFERENCE_NAMES
    from harness.trial import Trial

    out = Path(args.out or f"runs/{cfg.name}")
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
    print(format_table([(k, f"{final[k]:.4f}") for k in (*METRIC_NAMES, *REFERENCE_NAMES) if k in final]))
    print(f"outputs in {out}/: {', '.join(p.name for p in paths.values())}")
    if final.get("nonfinite"):
        print(f"error: the loss became NaN/inf at epoch {int(final['epoch'])}; training stopped "
              "(lower train.lr or the loss weights)", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    from harness.sweep_config import load_sweep

    sweep = load_sweep(args.file, args.overrides, smoke=args.smoke)  # validated before Ray starts
    from harness.sweep import best_rows, run_sweep, summary_table

    out = Path(args.out or f"runs/{sweep.name}")
    variants = sweep.variants()
    print(f"sweep {sweep.name}: {len(variants)} variant(s) x {sweep.budget.num_samples} trials, "
          f"metric {sweep.metric} ({sweep.mode}), ASHA {'on' if sweep.asha.enabled else 'off'}; output {out}/",
          flush=True)
    outcomes = run_sweep(sweep, out, address=args.address, resume=args.resume, mlflow_uri=args.mlflow_uri,
                         shared_storage=args.shared_storage)
    print(summary_table(best_rows(outcomes, sweep.metric, sweep.mode), sweep.metric))
    from harness.tracking import how_to_view

    total = sum(len(o.rows) for o in outcomes)
    errors = sum(o.errors for o in outcomes)
    uri = args.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    print(f"{total} trials ({errors} failed).")
    print(how_to_view(uri, sweep.name, out))
    return 0


def cmd_ablate(args) -> int:
    from harness.sweep_config import load_sweep

    sweep = load_sweep(args.file, args.overrides, smoke=args.smoke)
    from harness.study import run_ablation
    from harness.sweep import best_rows, summary_table

    out = Path(args.out or f"runs/{sweep.name}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds: {args.seeds}; give at least 1 confirmation seed")
    seeds = sweep.confirmation_seeds(args.seeds)
    print(f"study {sweep.name}: {len(sweep.variants())} variant(s), each tuned with {sweep.budget.num_samples} "
          f"trials, then confirmed over seeds {seeds} (disjoint from the tuning seeds); output {out}/", flush=True)
    outcomes = run_ablation(sweep, out, seeds, address=args.address, resume=args.resume, mlflow_uri=args.mlflow_uri,
                            shared_storage=args.shared_storage)
    confirmed = [phases["confirm"] for phases in outcomes.values() if "confirm" in phases]
    print(summary_table(best_rows(confirmed, sweep.metric, sweep.mode, top=len(seeds)), sweep.metric))
    from harness.tracking import how_to_view

    uri = args.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    print(how_to_view(uri, sweep.name, out))
    print(f"Report: harness report --experiment {sweep.name} --mlflow-uri {uri}")
    return 0


def cmd_compare(args) -> int:
    from harness.report import compare_runs

    print(compare_runs(args.run_ids, args.mlflow_uri))
    return 0


def cmd_report(args) -> int:
    from harness.report import write_report

    path = write_report(args.experiment, args.mlflow_uri, Path(args.out) if args.out else None)
    print(f"report written to {path}")
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
    p.add_argument("--seeds", type=int, default=3, help="confirmation seeds per variant (default 3; they start "
                   "at 1000, or after the largest tuning seed, so none repeats a tuning trial)")
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
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CLUSTER
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
