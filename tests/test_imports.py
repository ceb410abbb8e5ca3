"""The import graph is one-way: configuration at the bottom, then the science, the sweep layer
and the reports; a report needs neither torch nor Ray. The loss registry and the loss config
name the same terms. The package declares only what it imports."""
import ast
import subprocess
import sys

import pytest

from harness.config import LossConfig
from harness.science.losses import LOSS_TERMS, loss_weights
from tests.conftest import REPO

PACKAGE = REPO / "harness"


def module_name(path) -> str:
    """`sweep.tracking` for harness/sweep/tracking.py; `sweep` for harness/sweep/__init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def harness_imports(path) -> set[str]:
    """The harness modules the file at `path` imports anywhere (also inside functions), as
    dotted names below `harness.`."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness."):
            found.add(node.module.removeprefix("harness."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("harness.") for a in node.names if a.name.startswith("harness.")}
    return found - {module_name(path)}


def test_import_graph_has_no_cycles():
    graph = {module_name(p): harness_imports(p) for p in PACKAGE.rglob("*.py") if module_name(p)}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != "open", " -> ".join([*path, node, dep])
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert "science.losses" not in graph["config"]
    assert "sweep.tune" not in graph["sweep.tracking"] and not {"sweep.tune", "sweep.tracking"} & graph["sweep.files"]


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}; import sys; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_report_imports_neither_torch_nor_ray():
    loaded = _modules_after("import harness.report.write")
    assert "torch" not in loaded and "ray" not in loaded


def test_config_and_sweep_files_import_no_torch():
    loaded = _modules_after("import harness.config, harness.sweep.files")
    assert "torch" not in loaded and "harness.science.losses" not in loaded


def test_every_loss_term_is_a_config_weight_and_every_weight_a_term():
    fields = set(LossConfig.model_fields)
    assert set(LOSS_TERMS) <= fields
    # the other fields are options of a term: named after it, or shared by the diversity terms
    options = fields - set(LOSS_TERMS)
    shared = {"diversity_scope"}  # cos and ortho
    orphans = {f for f in options - shared if not any(f.startswith(f"{term}_") for term in LOSS_TERMS)}
    assert not orphans, f"LossConfig fields that are neither a registered term nor its option: {orphans}"
    assert list(loss_weights(LossConfig(kkt=2.0))) == list(LOSS_TERMS)
    assert loss_weights(LossConfig(kkt=2.0))["kkt"] == 2.0


def test_dependencies_are_the_ones_imported():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert "pandas" not in names and "psutil" not in names
    assert any(d.startswith("psutil") for d in project["optional-dependencies"]["benchmarks"])
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {"pandas", "psutil"} & imported, path.name
