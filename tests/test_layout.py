"""The shape of the code (issue 9): no module in pbx/ over MAX_LINES lines, and no import
cycle among the pbx modules.

Imports are read with `ast`, not by importing: every import statement counts, wherever
it is (module level, under `if TYPE_CHECKING:`, inside a function), because a cycle
hidden behind a lazy or type-only import is still two modules that cannot be understood
(or moved, or tested) one without the other. Cycles are the strongly connected
components of the import graph (Tarjan's algorithm).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600
# Modules allowed over MAX_LINES for now (path relative to the root -> why). An entry
# goes as soon as its module is short again: test_long_module_exceptions_are_still_needed.
LONG_MODULE_EXCEPTIONS: dict[str, str] = {}

Graph = dict[str, set[str]]


def modules_of(root: Path, package: str = "pbx") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `root`."""
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` (at `path`) imports, anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..sip import message`
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)  # `from pbx.sip import message`
                elif base in modules:
                    found.add(base)  # `from pbx.sip.message import SipRequest`
    return found


def import_graph(root: Path, package: str = "pbx") -> Graph:
    modules = modules_of(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: Graph) -> list[list[str]]:
    """Each import cycle as one path `a -> ... -> a` through a strongly connected
    component of more than one module (or a module importing itself); iterative Tarjan,
    so a deep graph cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(sorted(component))
    return [_cycle_through(sorted(c), graph) for c in sorted(components)]


def _cycle_through(component: list[str], graph: Graph) -> list[str]:
    """One closed path from the component's first module back to itself (shortest,
    breadth-first), to name the imports to break."""
    members = set(component)
    first = component[0]
    parent: dict[str, str | None] = {first: None}
    frontier = [first]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == first:
                    path = [node]
                    while (up := parent[path[-1]]) is not None:
                        path.append(up)
                    return [*reversed(path), first]
                if nxt not in parent:
                    parent[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {component}")  # a component always has one


def long_modules(root: Path, package: str = "pbx") -> dict[str, int]:
    """Path (relative to `root`) -> lines, for the modules over MAX_LINES."""
    out: dict[str, int] = {}
    for path in modules_of(root, package).values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            out[path.relative_to(root).as_posix()] = lines
    return out


# --------------------------------------------------------------------------- the tree


def test_no_module_in_pbx_is_over_the_line_limit() -> None:
    too_long = {path: lines for path, lines in long_modules(ROOT).items()
                if path not in LONG_MODULE_EXCEPTIONS}
    assert not too_long, (f"over {MAX_LINES} lines (split by responsibility): "
                          + ", ".join(f"{p} ({n})" for p, n in sorted(too_long.items())))


def test_long_module_exceptions_are_still_needed() -> None:
    long = long_modules(ROOT)
    stale = [path for path in LONG_MODULE_EXCEPTIONS if path not in long]
    assert not stale, f"no longer over {MAX_LINES} lines, remove from LONG_MODULE_EXCEPTIONS: {stale}"


def test_no_import_cycle_among_pbx_modules() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 50 and "pbx.sip.message" in graph["pbx.sip.transaction"]
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# --------------------------------------------------------------------------- the checks


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cycles_are_found_through_every_kind_of_import(tmp_path: Path) -> None:
    write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "pkg/b.py": "def f() -> None:\n    from pkg import c\n",
        "pkg/c.py": "from . import a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "import pkg.sub.e as e\n",
        "pkg/sub/e.py": "from ..sub.d import thing\n",
        "pkg/sub/f.py": "from pkg.sub import f\n",
        "pkg/leaf.py": "import os\nfrom pkg.a import x\nfrom pkg import b\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.leaf"] == {"pkg.a", "pkg.b"} and graph["pkg.a"] == {"pkg.b"}
    assert import_cycles(graph) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.sub.d", "pkg.sub.e", "pkg.sub.d"],
        ["pkg.sub.f", "pkg.sub.f"],
    ]


def test_no_cycle_in_a_tree_or_a_diamond() -> None:
    graph: Graph = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set(), "e": {"x"}}
    assert import_cycles(graph) == []
    graph["d"] = {"a"}
    assert import_cycles(graph) == [["a", "b", "d", "a"]]


def test_a_long_module_is_found(tmp_path: Path) -> None:
    write(tmp_path, {"pkg/__init__.py": "", "pkg/short.py": "x = 1\n" * MAX_LINES,
                     "pkg/deep/long.py": "x = 1\n" * (MAX_LINES + 1)})
    assert long_modules(tmp_path, "pkg") == {"pkg/deep/long.py": MAX_LINES + 1}
