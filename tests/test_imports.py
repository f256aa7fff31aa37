"""The import graph of confroute: no circles, and nothing outside confroute/cli/ imports it.

Edges are read with ``ast`` from every module: ``import`` and ``from ... import``
statements wherever they are (module level, inside functions, under
``TYPE_CHECKING``), and ``importlib.import_module("...")`` calls with a string
literal; a module that calls ``import_module`` with a variable (a lazy ``__getattr__``
table, a plugin table) gets an edge to every dotted module name it spells as a string.
``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``. A circle through function-level imports still couples
the modules both ways, so it counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import confroute

ROOT = Path(confroute.__file__).parent

#: ``python -m confroute`` is the command line's second entry point.
CLI_ENTRY_POINTS = {"confroute.__main__"}


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root``."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The known module a dotted import name lands in (None if outside the package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name ``module`` imports (statements anywhere, import_module strings).

    ``from pkg import x`` gives ``pkg.x``, which :func:`import_graph` resolves to the
    module ``pkg.x`` when there is one, else to ``pkg``.
    """
    names: list[str] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package)
            names += [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "import_module" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.append(arg.value)
                else:
                    dynamic = True
    if dynamic:  # import_module(variable): any dotted module name the module spells counts
        names += [node.value for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and "." in node.value and " " not in node.value]
    return names


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (self-imports left out)."""
    modules = find_modules(root, package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for name in imported_names(tree, module, is_package):
            if name.split(".")[0] == package:
                hit = _resolve(name, modules)  # ``from pkg import attr`` lands in pkg
                if hit is not None:
                    targets.add(hit)
        targets.discard(module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each
    given as one closed path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_closed_path(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _closed_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A cycle inside one component, from its smallest module back to it (BFS)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component always holds a cycle")


# ------------------------------------------------------------------------------ tests
def test_confroute_has_no_import_cycles():
    found = cycles(import_graph(ROOT, "confroute"))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_nothing_outside_the_cli_package_imports_it():
    graph = import_graph(ROOT, "confroute")
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if not (module == "confroute.cli" or module.startswith("confroute.cli."))
        and module not in CLI_ENTRY_POINTS
        for target in targets
        if target == "confroute.cli" or target.startswith("confroute.cli.")
    )
    assert not bad, "\n".join(bad)


def test_the_cli_package_loads_its_commands_without_importlib():
    for path in (ROOT / "cli").glob("*.py"):
        assert "import_module" not in path.read_text(encoding="utf-8"), path


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a module-level circle
        ({"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "import pkg.a\n"},
         [["pkg.a", "pkg.b", "pkg.a"]]),
        # a function-level import and a relative import close the circle
        ({"__init__.py": "", "a.py": "def f():\n    from .b import x\n",
          "b.py": "from pkg.c import y\n", "c.py": "from . import a\n"},
         [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]),
        # an importlib string closes it
        ({"__init__.py": "", "a.py": "import importlib\nimportlib.import_module('pkg.b')\n",
          "b.py": "from pkg.a import thing\n"},
         [["pkg.a", "pkg.b", "pkg.a"]]),
        # so does a table of module names imported through a variable
        ({"__init__.py": "", "a.py": "import importlib\nMODS = {'x': 'pkg.b'}\n"
          "def load(k):\n    return importlib.import_module(MODS[k])\n",
          "b.py": "from pkg.a import thing\n"},
         [["pkg.a", "pkg.b", "pkg.a"]]),
        # one-way imports, subpackages and outside packages: no circle
        ({"__init__.py": "from pkg.sub import m\n", "sub/__init__.py": "",
          "sub/m.py": "import os\nfrom pkg import leaf\n", "leaf.py": "import numpy\n"},
         []),
    ],
)
def test_the_walker_finds_circles_in_a_small_package(tmp_path, files, expected):
    root = _write(tmp_path / "pkg", files)
    assert cycles(import_graph(root, "pkg")) == expected


def test_the_walker_sees_an_import_of_the_cli_from_elsewhere(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "", "cli/__init__.py": "", "cli/_common.py": "",
        "serve.py": "def f():\n    from pkg.cli._common import load_router\n",
    })
    assert import_graph(root, "pkg")["pkg.serve"] == {"pkg.cli._common"}
