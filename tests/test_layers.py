"""Imports go one way: kernels <- calibration <- minimodel <- nodes <- apps.

Every module of the pack is parsed (``ast``; imports inside functions and ``if TYPE_CHECKING``
count too, so that a function-local import cannot hide a cycle) and each import of another part of
the pack is checked against ``ALLOWED``. ``minimodel`` is the mini model testbed (architecture, data,
text encoder, checkpoints); the programs that start ComfyUI or use the nodes are in ``apps``.
Nothing in the pack imports ``apps`` but ``__main__`` (which dispatches to it); tests, benchmarks and
docs/make_pictures.py are outside the pack and may import anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer -> the other layers its modules may import. "" is the package root: __init__.py (the version
# string, and ComfyUI's entry point, which imports nodes only inside ComfyUI) and __main__.py.
ALLOWED = {
    "kernels": {""},
    "calibration": {"", "kernels"},
    "minimodel": {"", "kernels", "calibration"},
    "nodes": {"", "kernels", "calibration", "minimodel"},
    "apps": {"", "kernels", "calibration", "minimodel", "nodes"},
}
ROOT_MODULES = {"__init__.py": {"nodes"}, "__main__.py": {"apps"}}  # the package root's own files


def imported_layers(path: Path, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """``(line, module, layer)`` for every import of a ``wan_w4a4`` module in ``path``, wherever it is
    in the file. ``layer`` is the first part below ``wan_w4a4`` ("" for the package root itself)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(path.relative_to(root).parent.parts)  # where relative imports start
                if node.level > 1:
                    base = base[:len(base) - (node.level - 1)]
                parts = ["wan_w4a4", *base, *(node.module.split(".") if node.module else [])]
                # `from . import x` / `from .. import x`: each x may be a module of its own layer
                targets = [parts + [a.name] for a in node.names] if not node.module else [parts]
            else:
                targets = [node.module.split(".")]
        else:
            continue
        for parts in targets:
            if parts[0] != "wan_w4a4":
                continue
            layer = parts[1] if len(parts) > 1 and (root / parts[1]).is_dir() else ""
            out.append((node.lineno, ".".join(parts), layer))
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    files = [root / name for name in ROOT_MODULES]
    for layer in ALLOWED:
        files += sorted((root / layer).rglob("*.py"))
    for path in files:
        rel = path.relative_to(root)
        own = rel.parts[0] if len(rel.parts) > 1 else None
        allowed = ALLOWED[own] if own else ROOT_MODULES[rel.name]
        for line, module, layer in imported_layers(path, root):
            if layer != own and layer not in allowed:
                bad.append(f"{rel}:{line}: imports {module} ({own or 'package root'} may import only "
                           f"{', '.join(sorted(x or 'the package root' for x in allowed))})")
    return bad


def test_every_layer_exists():
    for layer in ALLOWED:
        assert (ROOT / layer / "__init__.py").is_file(), layer


def test_imports_go_one_way():
    bad = violations()
    assert not bad, "imports against kernels <- calibration <- minimodel <- nodes <- apps:\n" + "\n".join(bad)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function, a relative one and `from .. import x` count."""
    for layer in ALLOWED:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    for name in ROOT_MODULES:
        (tmp_path / name).write_text("")
    (tmp_path / "calibration" / "a.py").write_text("def f():\n    from ..nodes import runtime\n")
    (tmp_path / "minimodel" / "b.py").write_text("from .. import apps\nimport wan_w4a4.kernels.numerics\n")
    (tmp_path / "kernels" / "c.py").write_text("from wan_w4a4 import __version__\n")
    bad = violations(tmp_path)
    assert [b.split(": imports ")[0] for b in bad] == ["calibration/a.py:2", "minimodel/b.py:1"], bad
