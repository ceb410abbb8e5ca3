"""The repository's Markdown links only to what the repository holds: every relative link in a
committed Markdown file names a file or folder inside the repository, and a link to a heading of a
Markdown file names a heading that file has (GitHub's anchors)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def markdown_files() -> list[Path]:
    """The Markdown files git knows of (tracked, or new and not ignored); outside a git checkout, those
    of the repository's own folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return sorted([REPO / "README.md", *(p for d in ("docs", "reports", "benchmarks", "search_spaces")
                                              for p in (REPO / d).rglob("*.md"))])
    return sorted(REPO / line for line in out.splitlines() if (REPO / line).is_file())


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, mailto:, ...


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Each relative link of `path` that leaves `root`, names nothing, or names a missing heading."""
    bad, root = [], root.resolve()
    for target in relative_links(path):
        file, _, fragment = target.partition("#")
        where = (path.parent / file).resolve() if file else path.resolve()
        if root not in (where, *where.parents):
            bad.append(f"{target}: outside the repository")
        elif not where.exists():
            bad.append(f"{target}: no such file")
        elif fragment and where.suffix == ".md" and fragment not in anchors(where):
            bad.append(f"{target}: no heading #{fragment} in {where.relative_to(root)}")
    return bad


def test_the_markdown_files_are_found():
    names = {p.relative_to(REPO).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/method.md", "reports/README.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_is_inside_the_repository(path):
    assert broken_links(path) == []


def test_the_readme_points_at_the_method_in_the_repository():
    targets = relative_links(REPO / "README.md")
    assert any(t.split("#")[0] == "docs/method.md" for t in targets)
    assert not any("shared/" in t for t in targets)


def test_links_that_leave_the_repository_or_miss_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# Title\n\n## 5. Metrics (each logged, names stable)\n")
    page = tmp_path / "README.md"
    page.write_text("[method](../shared/docs/method.md) [ok](docs/method.md#5-metrics-each-logged-names-stable)\n"
                    "[gone](docs/other.md) [no heading](docs/method.md#6-claims) `[code](../x.md)`\n"
                    "```\n[fenced](../y.md)\n```\n[web](https://example.org/a.md)\n")
    assert broken_links(page, tmp_path) == ["../shared/docs/method.md: outside the repository",
                                             "docs/other.md: no such file",
                                             "docs/method.md#6-claims: no heading #6-claims in docs/method.md"]
    assert anchor("Reports and comparisons: `harness report`, `harness compare`") == \
        "reports-and-comparisons-harness-report-harness-compare"
