"""The product's modules import each other without cycles (metrics ↔ runners.pool ↔
runners.generation was one): read from the source, TYPE_CHECKING and function-level imports
included, so a cycle hidden from the interpreter is found too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_PRODUCT = {"tests", "bench", "scripts", "deploy", "docs", "cli"}


def product_modules() -> dict[str, Path]:
    """The top-level modules and the packages (folders with an __init__.py) beside them: never a
    virtualenv or a cache folder in the checkout."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for package in ROOT.glob("*/__init__.py"):
        if package.parent.name in NOT_PRODUCT:
            continue
        for path in package.parent.rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts).removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    graph = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_product_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"metrics", "runners.pool", "runners.generation"} <= set(graph)  # the walk sees the modules
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
