"""The science: data, classifiers, the generator and the direct inverter, loss terms, the KKT
residual, metrics and image plots. Runs without Ray or MLflow; imports only `harness.config`,
`harness.cache` and `harness.records.metric_names` from the rest of the package."""
