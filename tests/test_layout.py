"""The shape of the package (docs/architecture.md): wings by concern, small modules, no import cycle, light imports.

These read the source (ast) and import modules in fresh interpreters; they check the rules a newcomer relies on when
reading the tree, so a change that breaks one says which rule and where.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "indexer"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
# Whole wings that may import torch when imported themselves; everything else must not at import time.
HEAVY = ("torch", "open_clip", "torchvision", "ray")


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def module_level_imports(name: str, path: Path) -> set[str]:
    """The indexer modules `name` imports when it is imported (not in functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in _top_level(tree.body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("indexer"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("indexer"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _exists(candidate) else node.module)
    return found


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.If, ast.Try)):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
            if isinstance(node, ast.Try):
                for handler in node.handlers:
                    yield from _top_level(handler.body)
        else:
            yield node


def _exists(module: str) -> bool:
    base = PACKAGE.parent.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def test_package_inits_hold_only_a_docstring() -> None:
    """Importing a package imports nothing else: callers import from the submodule that owns a name."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert ast.get_docstring(tree), f"{init} has no docstring"
        assert not body or init == PACKAGE / "__init__.py", f"{init} holds code: {[ast.unparse(n) for n in body]}"


def test_no_module_over_the_size_limit() -> None:
    long = {str(p.relative_to(PACKAGE)): n for _, p in modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them along their concerns): {long}"


def test_no_class_over_the_size_limit() -> None:
    big = {}
    for name, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (n := (node.end_lineno or 0) - node.lineno + 1) > MAX_CLASS_LINES:
                big[f"{name}.{node.name}"] = n
    assert not big, f"classes over {MAX_CLASS_LINES} lines: {big}"


def test_no_import_cycle() -> None:
    graph = {name: module_level_imports(name, path) for name, path in modules()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == node or dep not in graph:
                continue
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def imported_by(module: str) -> list[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "module",
    [
        "indexer.cli.main",
        "indexer.daemon.client",
        "indexer.store.factory",
        "indexer.store.status",
        "indexer.library.dedup",
        "indexer.library.cluster",
        "indexer.library.kmeans_torch",
        "indexer.library.export",
        "indexer.model.lazy",
        "indexer.decode.pool",
        "indexer.sources.scan",
    ],
)
def test_light_modules_import_no_torch(module: str) -> None:
    """The CLI's entry, the daemon client, the store and the library import no torch, open_clip or ray."""
    heavy = [m for m in imported_by(module) if m.split(".")[0] in HEAVY]
    assert not heavy, f"importing {module} imports {sorted({m.split('.')[0] for m in heavy})}"
