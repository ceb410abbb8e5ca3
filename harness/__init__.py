"""Network-inversion harness: one trial (`harness.trial`), sweeps (`harness.sweep`), studies and
reports (`harness.study`, `harness.report`). See README.md."""

__version__ = "0.1.0"
