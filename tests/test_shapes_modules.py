"""How the shapes package's modules depend on each other, checked with `ast` over every module in
``prompt2prompt/shapes``: no module takes another project module's private (``_underscore``)
names, and no function is longer than `MAX_FUNCTION_LINES`."""

import ast
from pathlib import Path

import pytest

import prompt2prompt.shapes

PACKAGE = Path(prompt2prompt.shapes.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_FUNCTION_LINES = 80


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project_module(module: str | None, level: int) -> bool:
    """Whether ``from <level dots><module> import ...`` names a module of this project."""
    return level > 0 or (module or "").split(".")[0] == "prompt2prompt"


def private_uses(source: str) -> list[str]:
    """Where ``source`` (a module of ``prompt2prompt.shapes``) takes a private name of another
    project module: ``from .world import _erode``, ``from ._x import y``, ``import prompt2prompt._x``,
    or ``world._erode`` where ``world`` was imported from the project. Returns ``"line N: name"``s."""
    tree = ast.parse(source)
    found, modules = [], set()  # modules: local names bound to project modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _project_module(node.module, node.level):
            if any(_private(part) for part in (node.module or "").split(".")):
                found.append(f"line {node.lineno}: {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: {alias.name}")
                modules.add(alias.asname or alias.name)  # may be a module (`from . import world`) or not: checked below
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "prompt2prompt":
                    found += [f"line {node.lineno}: {alias.name}" for part in alias.name.split(".") if _private(part)]
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_finds_private_names_taken_from_project_modules():
    assert private_uses("from . import world\nworld._erode(m, 1)\n") == ["line 2: world._erode"]
    assert private_uses("from .world import _TRAIN_PAIRS, SIZE\n") == ["line 1: _TRAIN_PAIRS"]
    assert private_uses("from ..attention import _split_heads\n") == ["line 1: _split_heads"]
    assert private_uses("import prompt2prompt.attention as a\na._split_heads\n") == ["line 2: a._split_heads"]
    assert private_uses("from . import world\nworld.erode(m, 1)\n") == []
    assert private_uses("import torch\ntorch._foreach_lerp_(a, b, 0.5)\n") == []  # not this project's
    assert private_uses("class A:\n    def f(self):\n        return self._x\n") == []  # a module's own names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_takes_another_modules_private_names(path):
    assert private_uses(path.read_text()) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_is_longer_than_the_limit(path):
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
