"""The shape of the package: no import circles (at any depth of a module), modules under 400 lines,
a loop a reader can hold in mind, and argparse only in the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "stillroom"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only: they never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every stillroom module that ``path`` imports when it runs, at module level or inside a function."""
    out = set()
    tree = ast.parse(path.read_text())
    skip = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                out.add(name)
    return out


def import_cycles() -> list[list[str]]:
    """The strongly connected components of the import graph with more than one module (Tarjan)."""
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(p, known) - {m} for m, p in mods.items()}
    # a package's __init__ re-exporting its modules is not a circle with them
    for m in graph:
        graph[m] = {d for d in graph[m] if not (m.startswith(d + ".") and mods[d].name == "__init__.py")}
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return comps


def test_no_import_circles():
    assert import_cycles() == []


def test_modules_stay_readable():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := p.read_text().count("\n")) > 400}
    assert long == {}


def test_the_loop_is_short():
    tree = ast.parse((PACKAGE / "train" / "loop.py").read_text())
    train = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 100


def test_argparse_only_in_the_command_line():
    users = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if "argparse" in p.read_text() and p.parent.name != "cli"]
    assert users == []
