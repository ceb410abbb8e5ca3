"""The package's layers stay honest: what each folder of `harness/` may import, read from the source
(every import statement, also the ones inside functions), so a forbidden import fails here even
where no test runs the function that holds it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "harness"

# layer folder -> module prefixes none of its files may import
FORBIDDEN = {
    "science": ("harness.sweep", "harness.trial", "harness.report", "harness.cli"),
    "records": ("torch", "torchvision", "ray", "harness.science", "harness.trial", "harness.sweep", "harness.report",
                "harness.cli"),
    "report": ("torch", "torchvision", "ray", "harness.science", "harness.trial", "harness.sweep", "harness.cli"),
}


def imported_modules(source: str, module: str) -> set[str]:
    """Every module an import statement in `source` names (relative imports resolved against
    `module`, the dotted name of the file that holds them)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:-node.level]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def violations(layer: str, source: str, module: str) -> list[str]:
    """The imports of `source` that `layer` forbids."""
    return sorted(name for name in imported_modules(source, module)
                  if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[layer]))


def test_the_checker_finds_a_forbidden_import_anywhere():
    """Known answers: a top-level, a lazy (inside a function), a `from` and a relative import."""
    assert violations("records", "import torch\n", "harness.records.results") == ["torch"]
    assert violations("report", "def f():\n    from ray import tune\n", "harness.report.write") == ["ray", "ray.tune"]
    assert violations("science", "from harness.sweep.files import x\n", "harness.science.data") == [
        "harness.sweep.files", "harness.sweep.files.x"]
    assert violations("science", "from ..trial import Trial\n", "harness.science.data") == [
        "harness.trial", "harness.trial.Trial"]
    assert violations("records", "import mlflow, scipy.stats\nfrom harness.config import ConfigError\n",
                      "harness.records.results") == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer):
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, f"harness/{layer}/ holds no modules"
    found = {}
    for path in files:
        module = f"harness.{layer}.{path.stem}"
        bad = violations(layer, path.read_text(), module)
        if bad:
            found[str(path.relative_to(PACKAGE.parent))] = bad
    assert not found, f"forbidden imports in the {layer} layer: {found}"


def test_every_layer_folder_says_what_it_is_for():
    for layer in ("science", "sweep", "records", "report"):
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"harness/{layer}/__init__.py: say what the layer is for and may import"
