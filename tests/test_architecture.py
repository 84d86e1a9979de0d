"""The shape of src/: layers point one way, no import cycles, short functions.

Read from the source with `ast` (nothing is imported), so a violation fails here with
the module and line, not later as a tangle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "backstream"
EDGE = f"{PACKAGE}.http"  # the HTTP edge: the core never imports it
ENTRY_POINTS = {f"{PACKAGE}.cli", f"{PACKAGE}.__main__"}  # they build the app: allowed to import the edge
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """(imported backstream module, line) for every import, lazy ones included; TYPE_CHECKING blocks skipped."""
    is_package = (SRC / Path(*name.split("."))).is_dir()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.module, node.level)
            if base.startswith(PACKAGE):
                # `from . import x` may name a submodule: count it as one when it is.
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    yield (sub if _exists(sub) else base), node.lineno


def _resolve(name: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    parts = name.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _exists(dotted: str) -> bool:
    path = SRC / Path(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_the_core_never_imports_the_http_edge() -> None:
    offenders = [
        f"{name}:{line} imports {target}"
        for name, tree in modules().items()
        if not name.startswith(EDGE) and name not in ENTRY_POINTS
        for target, line in imports(name, tree)
        if target == EDGE or target.startswith(EDGE + ".")
    ]
    assert offenders == []


def test_no_import_cycles() -> None:
    trees = modules()
    graph = {name: {t for t, _ in imports(name, tree) if t in trees and t != name} for name, tree in trees.items()}
    # A package importing its own submodules (re-exports in __init__) is not a cycle of concern.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = _cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_functions_stay_short() -> None:
    long = [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_checks_see_a_violation() -> None:
    """The checks themselves can fail: a planted cycle is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _resolve("backstream.store.redis", False, "base", 1) == "backstream.store.base"
    assert _resolve("backstream.store", True, "config", 2) == "backstream.config"
