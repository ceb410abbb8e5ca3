"""`harness index`: the index of reports/README.md is generated from the reports, and the committed
one is current. Known answers on a hand-made report: the pooling study's per-seed table decided
under the paired rule."""
from pathlib import Path

from harness.cli import main
from harness.report.index import END, START, read_report, rescore, write_index
from tests.conftest import REPO

REPORT = """# Study `pool`

Pooling.

Made with:

```bash
harness ablate search_spaces/pool.yaml --out runs/pool
harness report --experiment pool --mlflow-uri sqlite:///runs/pool/mlflow.db
```

## Verdict

**inconclusive**: Average pooling leaks more. coverage_gap: pool=avg 0.388 ± 0.164 (n=8) vs pool=max 0.163 ± 0.076 (n=8) (mean ± 95% CI half-width over seeds); the intervals overlap.

## Per seed

| variant | seed | coverage_gap | collapsed |
|---|---|---|---|
| pool=avg | 1000 | 0.300 | no |
| pool=avg | 1001 | 0.500 | no |
| pool=avg | 1002 | 0.450 | no |
| pool=avg | 1003 | 0.300 | no |
| pool=max | 1000 | 0.100 | no |
| pool=max | 1001 | 0.200 | no |
| pool=max | 1002 | 0.150 | no |
| pool=max | 1003 | 0.200 | no |
| pool=avg | 1004 | 0.300 | no |
| pool=avg | 1005 | 0.500 | no |
| pool=avg | 1006 | 0.450 | no |
| pool=avg | 1007 | 0.300 | no |
| pool=max | 1004 | 0.100 | no |
| pool=max | 1005 | 0.200 | no |
| pool=max | 1006 | 0.150 | no |
| pool=max | 1007 | 0.200 | no |
"""


def test_a_report_is_read_and_decided_again_under_the_paired_rule(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "README.md").write_text(REPORT)
    s = read_report(tmp_path / "pool" / "README.md")
    assert (s.study, s.metric, s.greater, s.lesser) == ("pool", "coverage_gap", "pool=avg", "pool=max")
    assert s.commands[0] == "harness ablate search_spaces/pool.yaml --out runs/pool"
    assert s.values("pool=avg", "coverage_gap") == {1000: 0.3, 1001: 0.5, 1002: 0.45, 1003: 0.3, 1004: 0.3,
                                                    1005: 0.5, 1006: 0.45, 1007: 0.3}
    kind, text = rescore(s)
    # paired differences 0.2, 0.3, 0.3, 0.1 twice: mean 0.225, sd sqrt(0.055 / 7) = 0.0886,
    # t(0.975, 7) = 2.365 -> half-width 0.0741, [0.151, 0.299]; all eight of one sign: p = 2/256
    assert kind == "supported"
    assert "0.225, 95% CI [0.151, 0.299]" in text and "p = 0.008" in text
    readme = tmp_path / "README.md"
    readme.write_text("# Reports\n\nProse kept.\n\n" + START + "\nstale\n" + END + "\n\nNotes kept.\n")
    assert not write_index(readme, check=True)
    assert main(["index", "--readme", str(readme), "--check"]) == 1
    assert main(["index", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "Prose kept." in text and "Notes kept." in text and "stale" not in text
    assert "inconclusive → **supported**" in text
    assert main(["index", "--readme", str(readme), "--check"]) == 0


def test_the_committed_index_is_current():
    assert write_index(REPO / "reports" / "README.md", check=True), "run `harness index` and commit reports/README.md"


def test_a_claim_above_a_value_is_decided_again_against_that_value(tmp_path):
    rows = "\n".join(f"| arch=mlp | {1000 + i} | {g:.3f} | no |" for i, g in enumerate((0.2, 0.3, 0.3, 0.1) * 2))
    text = ("# Study `arch`\n\n## Verdict\n\n**supported**: MLPs leak. coverage_gap: arch=mlp 0.225 ± 0.074 (n=8) "
            "vs value 0.000 (mean ± 95% CI half-width over seeds); ...\n\n## Per seed\n\n"
            "| variant | seed | coverage_gap | left out |\n|---|---|---|---|\n" + rows + "\n")
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "README.md").write_text(text)
    s = read_report(tmp_path / "arch" / "README.md")
    assert (s.metric, s.greater, s.lesser, s.above) == ("coverage_gap", "arch=mlp", None, 0.0)
    kind, line = rescore(s)
    # gaps 0.2, 0.3, 0.3, 0.1 twice against 0: mean 0.225, 95% CI [0.151, 0.299], p = 2/256
    assert kind == "supported" and "coverage_gap arch=mlp − 0: 0.225, 95% CI [0.151, 0.299]" in line
    assert "p = 0.008" in line
