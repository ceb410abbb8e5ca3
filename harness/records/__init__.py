"""The records: metric names, the best-trial rule and intervals (`results`), the MLflow store and
the Optuna study as written by a sweep. Imports only `harness.config`, the standard library,
scipy, MLflow and Optuna: never torch, Ray or a higher layer, so a study reads on any machine."""
