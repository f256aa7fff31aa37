"""Structural rules of the package (issue 11): short functions, no reaching into other
modules' underscore names.

Both rules are measured on the source with ``ast``, so they hold for every module,
including those a test run never imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "confroute"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {
        str(p.relative_to(PACKAGE.parent)): ast.parse(p.read_text(encoding="utf-8"))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


MODULES = _modules()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_private_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _is_private(n)}


DEFINED = {mod: _defined_private_names(tree) for mod, tree in MODULES.items()}


def test_no_function_is_longer_than_the_limit() -> None:
    too_long = []
    for mod, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{mod}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def test_no_module_imports_another_modules_private_names() -> None:
    bad = []
    for mod, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("confroute"):
                bad += [f"{mod}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if _is_private(a.name)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_module_uses_underscore_attributes_defined_elsewhere(mod: str) -> None:
    """``obj._name`` is allowed on ``self``/``cls`` or when this module defines ``_name``."""
    own = DEFINED[mod]
    elsewhere = set().union(*(names for other, names in DEFINED.items() if other != mod))
    bad = []
    for node in ast.walk(MODULES[mod]):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if node.attr in own or node.attr not in elsewhere:
            continue
        bad.append(f"{mod}:{node.lineno} uses .{node.attr}")
    assert not bad, "\n".join(bad)
