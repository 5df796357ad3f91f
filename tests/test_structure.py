"""The codebase's shape, checked so it stays one a new maintainer can hold in their head: lint,
module and function sizes, and import arrows that point one way (docs/DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "pdm_jax"
MAX_MODULE_LINES = 400
MAX_MAIN_LINES = 60
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The pdm_jax module an import name lands in (a package's names live in its __init__)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, module: str) -> set[str]:
    """Every pdm_jax module `module` imports, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1]])
                base = f"{base}.{node.module}" if node.module else base
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("pdm_jax"):
                target = _target(name)
                if target and target != module:
                    found.add(target)
    return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_ruff_is_clean_with_the_complexity_and_argument_limits():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    config = (REPO / "pyproject.toml").read_text()
    assert '"C901"' in config and "max-complexity = 15" in config
    assert '"PLR0913"' in config and "max-args = 8" in config


def test_modules_are_short_and_main_is_a_flag_parser():
    lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    too_long = {name: n for name, n in lines.items() if n > MAX_MODULE_LINES}
    assert not too_long, too_long
    assert lines["pdm_jax.main"] <= MAX_MAIN_LINES


def _named_kernels() -> set[str]:
    """The numerical kernels docs/DESIGN.md allows past the function limit, with its reasons."""
    design = (REPO / "docs" / "DESIGN.md").read_text()
    section = design.split("Functions longer than", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`(\w+)`", section))


def test_functions_are_short_except_the_named_kernels():
    kernels = _named_kernels()
    assert len(kernels) <= 3
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and node.name not in kernels:
                    long[f"{name}.{node.name}"] = length
    assert not long, long


def test_no_import_cycle_including_imports_inside_functions():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            # A package importing its own submodules (its __init__ re-exports) is not a cycle.
            outside = [
                m for m in component if not any(_is_within(m, p) for p in component if p != m)
            ]
            if len(component) > 1 and len(outside) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, cycles


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("pdm_jax.inference", ("pdm_jax.training",)),
        ("pdm_jax.checkpoint", ("pdm_jax.models", "pdm_jax.training", "pdm_jax.inference")),
        ("pdm_jax.prediction", ("pdm_jax.training", "pdm_jax.inference")),
    ],
)
def test_imports_point_one_way(package, forbidden):
    """Not even indirectly: inference runs where training code is not wanted, and checkpoints
    are read by tools that know nothing of models."""
    members = [m for m in MODULES if _is_within(m, package)]
    assert members, package
    reached = set().union(*(_reach(m) for m in members))
    bad = sorted(m for m in reached for f in forbidden if _is_within(m, f))
    assert not bad, bad


def test_models_know_nothing_of_data_storage_or_training():
    for name in (m for m in MODULES if _is_within(m, "pdm_jax.models")):
        outside = {m for m in GRAPH[name] if not _is_within(m, "pdm_jax.models")}
        assert outside <= {"pdm_jax.errors"}, (name, outside)


def test_one_batched_prediction_loop_and_one_list_of_model_names():
    loops = [
        name
        for name, path in MODULES.items()
        if "eval_batches(" in path.read_text() and not name.startswith("pdm_jax.data")
    ]
    assert loops == ["pdm_jax.prediction"], loops
    names = [
        str(path.relative_to(REPO))
        for path in [*PACKAGE.rglob("*.py"), *(REPO / "scripts").glob("*.py")]
        if re.search(r"\(\s*\"(tft|cnn_bilstm)\",\s*\"(tft|cnn_bilstm)\"\s*\)", path.read_text())
    ]
    assert names == ["pdm_jax/models/__init__.py"], names
