"""Imports run one way: no module of explora_geo imports itself back through others (lazy imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

import explora_geo

ROOT = Path(explora_geo.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> explora_geo modules it imports anywhere in its body (importing ``a.b`` also runs ``a``)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target.count(".") >= 1:  # the module and every package above it (not the root)
                    if target in modules and target != name and not name.startswith(target + "."):
                        deps.add(target)
                    target = target.rsplit(".", 1)[0]
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_detector_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "explora_geo.training.trainer" in graph
    assert "explora_geo.sidecar" in graph["explora_geo.models.weights.local_files"]
    assert cycles(graph) == []


def test_training_package_imports_run_one_way() -> None:
    graph = import_graph()
    order = ["config", "setup", "task", "datamodule", "outputs", "trainer"]
    for i, name in enumerate(order):
        inside = {d.rsplit(".", 1)[1] for d in graph[f"explora_geo.training.{name}"]
                  if d.startswith("explora_geo.training.")}
        assert inside <= set(order[:i]), (name, inside)
