"""The mini model's modules, and the programs in ``apps/`` (its training, sampling and pictures among
them), import one another one way: no module imports (at its top or inside a function) a module of
its package that imports it back, directly or through others. Imports between packages are
tests/test_layers.py's."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sibling_imports(path: Path) -> set[str]:
    """Names of the modules of its own package that ``path`` imports anywhere in it (relative imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(a.name for a in node.names)
    return names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def _graph(package: str) -> dict[str, set[str]]:
    return {p.stem: sibling_imports(p) for p in (ROOT / package).glob("*.py")}


def test_minimodel_has_no_import_cycle():
    graph = _graph("minimodel")
    assert "data" in graph["conditioning"] and "text" in graph["text_clip"]  # edges inside the testbed
    assert find_cycle(graph) is None, find_cycle(graph)


def test_apps_have_no_import_cycle():
    graph = _graph("apps")
    # the edges this test guards: pictures sample, training draws pictures, the demo calibrates
    assert "mini_sample" in graph["mini_pictures"] and "mini_pictures" in graph["mini_train"]
    assert "calibrate" in graph["demo"] and "runtime" in graph["mini_sample"]
    assert find_cycle(graph) is None, find_cycle(graph)
