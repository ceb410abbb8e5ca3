"""The report: verdict rules (`verdicts`), Markdown sections (`sections`), figures and
`harness compare` (`figures`), and `harness report` itself (`write`). Imports the records and
`harness.config` only: never torch, Ray, the science or the sweep layer."""
