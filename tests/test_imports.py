"""The package's shape: no import cycle among its modules, the kernels free of the trainer and its settings, and
no module longer than 450 lines without a reason on its first line.

The graph is read from the source with `ast`, not by importing: an arrow is an import that runs when the module is
imported (its top level, `if TYPE_CHECKING:` blocks included, since a circle that only type checkers follow still
ties the modules together); imports inside functions run later, on a call, and are left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dopd"
MAX_LINES = 450
# A long module's first line says why, e.g. "Every setting ...; over 450 lines on purpose: each key ... in one place."
REASON = re.compile(r"\bover \d+ lines\b[^:]*:\s*\S", re.IGNORECASE)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its `__init__.py`)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _top_level_imports(tree: ast.Module):
    """The import statements that run when the module is imported: all but those inside functions."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        pending.extend(ast.iter_child_nodes(node))


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The package's modules an import statement of module `name` runs: `from X import m` runs the module X.m
    when m is one, else X itself (whose `__init__` must define the name)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    targets = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        targets.add(submodule if submodule in modules else base)
    return targets & set(modules)


def import_graph() -> dict[str, set[str]]:
    """Each module's arrows to the package's modules it imports when it is imported."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        arrows = set()
        for node in _top_level_imports(tree):
            arrows |= _targets(name, path, node, modules)
        graph[name] = arrows - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, pending = set(), [start]
    while pending:
        for child in graph[pending.pop()]:
            if child not in seen:
                seen.add(child)
                pending.append(child)
    return seen


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_type_checking_imports_and_not_those_in_functions():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
        "def f():\n    from .c import C\nfrom . import d\n"
    )
    modules = {"p": Path("p/__init__.py"), "p.a": Path("p/a.py"), "p.b": Path("p/b.py"), "p.c": Path("p/c.py")}
    modules["p.d"] = Path("p/d.py")
    found = set()
    for node in _top_level_imports(tree):
        found |= _targets("p.a", Path("p/a.py"), node, modules)
    assert found == {"p.b", "p.d"}


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


def test_the_kernels_import_neither_the_trainer_nor_its_settings():
    graph = import_graph()
    kernels = [name for name in graph if name == f"{PACKAGE}.kernels" or name.startswith(f"{PACKAGE}.kernels.")]
    assert kernels
    for name in kernels:
        reached = reachable(graph, name) & {f"{PACKAGE}.train", f"{PACKAGE}.config"}
        assert not reached, f"{name} imports {sorted(reached)} (directly or through the modules it imports)"


def _first_line(path: Path) -> str:
    """The module docstring's first line, else the first comment line at the top of the file."""
    text = path.read_text()
    docstring = ast.get_docstring(ast.parse(text), clean=False)
    if docstring:
        return docstring.strip().splitlines()[0]
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip() if line.lstrip().startswith("#") else ""
    return ""


def test_long_modules_say_why_on_their_first_line():
    long_without_reason = []
    for path in sorted(SRC.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and not REASON.search(_first_line(path)):
            long_without_reason.append(f"{path.relative_to(SRC)} ({lines} lines)")
    assert not long_without_reason, (
        f"over {MAX_LINES} lines without a reason on the first line (e.g. 'over {MAX_LINES} lines on purpose: ...'): "
        + ", ".join(long_without_reason)
    )
