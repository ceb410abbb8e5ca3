"""The sweep layer: sweep files (`files`), Ray Tune + Optuna + ASHA (`tune`), MLflow tracking
(`tracking`) and the ablation study (`study`). A thin wrapper over `harness.trial`; it may import
the trial, the science, the records and `harness.report.verdicts`, never the report's writers."""
