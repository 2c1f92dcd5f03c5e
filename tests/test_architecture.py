"""The package's layout rules (docs/architecture.md), read from the source: no import cycles,
the engine sees the speed layer only through speed/interface.py, small modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cifar_run"
MAX_MODULE_LINES = 430
MAX_FUNCTION_LINES = 80  # code lines, the docstring aside


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports anywhere (functions included), and the
    packages above each, whose __init__ runs first."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                parts = target.split(".")
                found |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
    return found - {name}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def test_no_import_cycles() -> None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for other in sorted(GRAPH[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


def test_the_engine_sees_the_speed_layer_only_through_its_interface() -> None:
    for name, deps in GRAPH.items():
        if name.startswith("cifar_run.engine"):
            speed = {d for d in deps if d.startswith("cifar_run.speed")}
            assert speed <= {"cifar_run.speed", "cifar_run.speed.interface"}, (name, speed)
    assert "cifar_run.speed.interface" in GRAPH["cifar_run.engine.loop"]


def test_modules_and_functions_stay_small() -> None:
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        assert len(lines) <= MAX_MODULE_LINES, f"{name}: {len(lines)} lines"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                if (
                    body
                    and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                ):
                    body = body[1:] or body
                length = node.end_lineno - body[0].lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{name}.{node.name}: {length} lines"
