"""The package's shape: no import cycle among its own modules, and no over-long function.

Both are read from the source with `ast`, so they need no model and run in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "prompt2prompt"
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_targets(node: ast.AST, package: str, known: set[str]) -> set[str]:
    """The package's modules an import statement names; ``package`` is the importing module's package."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        # ``from pkg import sub`` imports the submodule; ``from pkg import name`` needs pkg's __init__ to have run
        targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
    else:
        return set()
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any level (module top or inside a function)."""
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = set().union(*(import_targets(n, package, known) for n in ast.walk(tree))) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve():
    known = {"prompt2prompt", "prompt2prompt.edits", "prompt2prompt.shapes", "prompt2prompt.shapes.world"}
    tree = ast.parse("from . import world\nfrom ..edits import LocalBlend\nimport numpy\n")
    found = set().union(*(import_targets(n, "prompt2prompt.shapes", known) for n in ast.walk(tree)))
    assert found == {"prompt2prompt.shapes.world", "prompt2prompt.edits"}
    tree = ast.parse("from . import __version__\n")
    assert import_targets(tree.body[0], "prompt2prompt", known) == {"prompt2prompt"}


def test_no_import_cycle():
    graph = import_graph()
    assert "prompt2prompt.pipeline" in graph and graph["prompt2prompt.pipeline"], "the graph reads the imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines, signature and body, less its docstring (an ``Args:`` list is not code)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def functions() -> list[tuple[str, int]]:
    """(qualified name, code lines) of every function and method in the package."""
    out = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    qual = f"{prefix}.{child.name}"
                    out.append((qual, code_lines(child)))
                    walk(child, qual)
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}.{child.name}")

        walk(tree, name)
    return out


def test_no_function_over_the_limit():
    found = functions()
    assert len(found) > 100, "the walk finds the package's functions"
    long = {name: lines for name, lines in found if lines > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_code_lines_leave_out_the_docstring():
    tree = ast.parse('def f(a):\n    """Doc.\n\n    Args:\n        a: x\n    """\n    return a\n')
    assert code_lines(tree.body[0]) == 2
