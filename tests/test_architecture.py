"""The package's shape, read from its source: which module may import which, and the artifact names.

Rules (DESIGN.md, "Import boundaries"): config, storage, lease, runtime, errors and artifacts import no
deep-learning library; kube imports neither torch nor faiss nor any step; steps import neither
the command line nor each other; config imports only config and errors. Every artifact folder and
file name is spelled in `artifacts/layout.py` only.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfit.artifacts import layout

PACKAGE = Path(__file__).resolve().parent.parent / "clusterfit"
DEEP_LEARNING = ("torch", "torchvision", "faiss", "sklearn")
STEP_MODULES = {f"clusterfit.steps.{s}" for s in ("pretrain", "extract", "cluster", "train", "evaluate")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules `path` imports anywhere in the file (absolute names; `from x import y` counts x and x.y)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def deep_learning(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in DEEP_LEARNING}


def test_the_tree_has_the_layers_the_rules_speak_of() -> None:
    found = set(modules())
    assert found >= STEP_MODULES
    assert {"clusterfit.config.schema", "clusterfit.config.loading", "clusterfit.config.kubernetes"} <= found
    assert {"clusterfit.artifacts.layout", "clusterfit.artifacts.manifest", "clusterfit.artifacts.features"} <= found
    assert {"clusterfit.kube.manifests", "clusterfit.kube.controller", "clusterfit.kube.commands"} <= found


BASE = ["config", "artifacts", "kube", "storage", "s3", "runtime", "errors", "pipeline", "lease"]


@pytest.mark.parametrize("prefix", [f"clusterfit.{name}" for name in BASE])
def test_base_modules_import_no_deep_learning_library(prefix: str) -> None:
    for name, path in modules().items():
        if name == prefix or name.startswith(prefix + "."):
            assert not deep_learning(imports(path)), f"{name} imports {deep_learning(imports(path))}"


def test_kube_imports_no_step() -> None:
    for name, path in modules().items():
        if name.startswith("clusterfit.kube"):
            bad = {n for n in imports(path) if n.startswith("clusterfit.steps")}
            assert not bad, f"{name} imports {bad}"


def test_steps_import_neither_the_cli_nor_each_other() -> None:
    for name in STEP_MODULES:
        found = imports(modules()[name])
        others = {n for n in found if n.startswith("clusterfit.steps") and n != name}
        assert not others, f"{name} imports the steps {others}"
        assert not {n for n in found if n.startswith(("clusterfit.cli", "clusterfit.pipeline"))}, name


def test_config_imports_only_config_and_errors() -> None:
    for name, path in modules().items():
        if name.startswith("clusterfit.config"):
            ours = {n for n in imports(path) if n.startswith("clusterfit")}
            assert all(n.startswith(("clusterfit.config", "clusterfit.errors")) for n in ours), f"{name}: {ours}"


def test_nothing_below_the_command_line_imports_it() -> None:
    for name, path in modules().items():
        if name not in ("clusterfit.cli", "clusterfit.__main__"):
            assert "clusterfit.cli" not in imports(path), name


def test_the_cluster_step_loads_no_torch_when_imported() -> None:
    # The rule above reads the source; this runs it: the cluster image has no torch at all.
    code = (
        "import sys, clusterfit, clusterfit.steps.cluster, clusterfit.pipeline, clusterfit.cli, "
        "clusterfit.kube.commands, clusterfit.kube.render, clusterfit.kube.chart_schema\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def layout_names() -> set[str]:
    """Every file or folder name the layout module defines as a constant."""
    values = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
    return {v for v in values if "." in v or v.startswith("_")} | {"_chunks", "_work", "checkpoints/"}


def string_constants(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module (f-string parts included), with line numbers; docstrings and
    config field descriptions (documentation, not names the code uses) left out."""
    tree = ast.parse(path.read_text())
    descriptions = {
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "description"
    }
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | descriptions
    ]


def test_artifact_names_are_spelled_in_the_layout_module_only() -> None:
    names = layout_names()
    assert names >= {"labels.npy", "final.pt", "_SUCCESS.json", "latest.json", "report.html"}
    spelled = re.compile(r"(^|[/\s('\"])(" + "|".join(map(re.escape, names)) + r")($|[/\s)'\",.:])")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}: {value!r}"
        for module, path in modules().items()
        if module != "clusterfit.artifacts.layout"
        for line, value in string_constants(path)
        if spelled.search(value)
    ]
    assert not offenders, "\n".join(offenders)
