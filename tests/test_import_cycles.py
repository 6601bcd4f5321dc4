"""Import direction inside vlpet (issue 17): the cycles that used lazy imports as a workaround stay gone.

Reads every module's imports, top-level and inside functions, and checks that no module of a group reaches
another module of its group and back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vlpet"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the vlpet modules it imports anywhere in its text} (relative imports resolved)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        graph[name] = {m for m in out if m.startswith("vlpet")}
    return {k: {m for m in v if m in graph} for k, v in graph.items()}


def reaches(graph, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return False


@pytest.fixture(scope="module")
def graph():
    return import_graph()


@pytest.mark.parametrize("low,high", [("vlpet.checkpoint", "vlpet.model"), ("vlpet.frozen_precision", "vlpet.model"),
                                      ("vlpet.data.video", "vlpet.data.datasets"),
                                      ("vlpet.backbones.norms", "vlpet.model")])
def test_dependency_goes_one_way(graph, low, high):
    assert reaches(graph, high, low), (high, low)  # the graph sees the real imports
    assert not reaches(graph, low, high), f"{low} imports {high} (directly or through others): a cycle"
