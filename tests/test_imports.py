"""No import cycle anywhere in ``bsbr/``, in-function imports included.

Every module's ``import``/``from`` statements at any depth (module level, functions, methods, ``if`` blocks) are read
with ``ast``; relative imports and ``from package import name`` are resolved to the ``bsbr`` module they load (the
submodule when ``name`` is one, else the package's ``__init__``). A cycle in that graph fails the test, named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str = "bsbr") -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of ``package`` under ``root`` (``__init__`` as the
    package's own name)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest known module that ``name`` (dotted) is or lies in, or None (outside the package)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` (at ``path``) imports, at any depth of its syntax tree."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 more
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names]  # a submodule, or a name in source
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph(root: Path, package: str = "bsbr") -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the smallest-named module of ``component`` (breadth-first search back to it)."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]  # [start, ..., node, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


# --- the checker on a made-up package -----------------------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_in_function_relative_and_package_imports(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "import os\n\ndef f():\n    from . import b  # in a function, relative\n    return b\n",
        "pkg/b.py": "if True:\n    from pkg.sub import thing\n",
        "pkg/sub/__init__.py": "from .deep import thing\n",
        "pkg/sub/deep.py": "import pkg.a\nthing = 1\n",
        "pkg/leaf.py": "from pkg import a\nimport numpy\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub"}, "pkg.sub": {"pkg.sub.deep"},
                     "pkg.sub.deep": {"pkg.a"}, "pkg.leaf": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.deep", "pkg.a"]]


def test_checker_on_an_acyclic_package_and_a_two_module_cycle(tmp_path):
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "x = 1\n"})
    assert find_cycles(import_graph(tmp_path, "pkg")) == []
    write_package(tmp_path, {"pkg/b.py": "def g():\n    from pkg.a import h\n"})
    assert find_cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b", "pkg.a"]]


# --- bsbr -----------------------------------------------------------------------------------------------------------


def test_bsbr_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT)
    assert "bsbr.convert.base" in graph and "bsbr.normalized" in graph  # the graph covers the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in bsbr/ (in-function imports included):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("module", ["bsbr.normalized", "bsbr.utils"])
def test_core_helpers_import_nothing_from_the_converter(module):
    """The normalised retrieval's maths and the shared helpers sit below the converter (no model family in them)."""
    assert not any(name.startswith("bsbr.convert") for name in import_graph(PACKAGE_ROOT)[module])
