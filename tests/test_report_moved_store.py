"""`harness report` and `harness compare` on a store that was moved: its runs still point at the
absolute artifact folders of the old place. Both must say which artifacts they could not read and
why, and the report must say why each figure it promises is missing. No Ray: a hand-made store."""
import shutil

from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.sweep.tracking import client_for, ensure_experiment


def make_store(root, fresh_store, searched: bool = True):
    uri = fresh_store(root / 'mlflow.db')
    client = client_for(uri)
    exp = ensure_experiment(client, "moved", root / "mlartifacts")
    parent = client.create_run(exp, run_name="sweep-moved", tags={"harness.kind": "sweep",
                                                                  "harness.optuna_storage": f"sqlite:///{root / 'optuna.db'}"})
    client.log_param(parent.info.run_id, "name", "moved")
    if searched:
        client.log_param(parent.info.run_id, "search.loss.tv.dist", "uniform")
    (root / "grid.png").write_bytes(b"not really a png")
    kids = []
    for i in range(2):
        run = client.create_run(exp, run_name=f"all-{i}", tags={"mlflow.parentRunId": parent.info.run_id,
                                                               "harness.variant": "all", "harness.phase": "tune"})
        client.log_metric(run.info.run_id, "score", 0.1 * (i + 1), step=1)
        client.log_artifact(run.info.run_id, str(root / "grid.png"))
        client.set_terminated(run.info.run_id, "FINISHED")
        kids.append(run.info.run_id)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return kids


def test_report_and_compare_name_the_artifacts_of_a_moved_store(tmp_path, capsys, fresh_store):
    kids = make_store(tmp_path / "there", fresh_store)
    shutil.move(tmp_path / "there", tmp_path / "here")
    uri = f"sqlite:///{tmp_path / 'here' / 'mlflow.db'}"
    assert MlflowClient(uri).get_experiment_by_name("moved") is not None

    out = tmp_path / "report"
    assert main(["report", "--experiment", "moved", "--mlflow-uri", uri, "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    section = text.split("## Artifacts that could not be read")[1]
    # the figure of one run per variant reads the median run's: of two, the lower (all-0, score 0.1)
    assert "| all-0 | grid.png |" in section and "does not exist on this machine" in section
    assert str(tmp_path / "there") in section
    grids = text.split("### Median-seed inversion of each variant")[1].split("###")[0]
    assert "Not drawn:" in grids and "grid.png" in grids
    importance = text.split("### Loss-weight importance (Optuna, per variant)")[1]
    assert "Not drawn: no Optuna study was found" in importance

    capsys.readouterr()
    assert main(["compare", *kids, "--mlflow-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "| **artifacts** | not readable (below) | not readable (below) |" in printed
    assert "Artifacts that could not be read:" in printed and "does not exist on this machine" in printed

    # the same store at its own place: nothing is reported missing
    shutil.move(tmp_path / "here", tmp_path / "there")
    assert main(["compare", *kids, "--mlflow-uri", f"sqlite:///{tmp_path / 'there' / 'mlflow.db'}"]) == 0
    printed = capsys.readouterr().out
    assert "| **artifacts** | grid.png | grid.png |" in printed and "could not be read" not in printed


def test_a_report_of_a_sweep_without_a_search_draws_no_importance_and_reads_no_optuna_file(tmp_path, fresh_store):
    make_store(tmp_path, fresh_store, searched=False)
    out = tmp_path / "report"
    assert main(["report", "--experiment", "moved", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    importance = text.split("### Loss-weight importance (Optuna, per variant)")[1]
    assert importance.lstrip().startswith("Not drawn: this study searched no setting")
    assert "optuna.db" not in text
