"""Network-inversion harness. Layers, lowest first: `harness.config` and `harness.cache`; the
science (`harness.science`: data, classifiers, inverters, losses, metrics); one trial
(`harness.trial`); the records (`harness.records`); the sweep layer (`harness.sweep`: Ray Tune,
MLflow, studies); the report (`harness.report`); the command line (`harness.cli`). See README.md."""

__version__ = "0.1.0"
