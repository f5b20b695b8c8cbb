"""The architecture's rules, read from the source: private names, import cycles, directions.

The package's modules form layers (reference, kernels, stats, the torch op, the layers, the
tools, the lab and the command line) with imports going one way. These tests parse every
module under ``src/batchnorm`` and check:

* no module uses another module's private names (helpers shared inside one subpackage, such as
  ``kernels/`` or ``lab/``, aside);
* there is no import cycle, counting imports inside functions too;
* the torch op does not import the layers, and the layers do not import the tools;
* no source file grows past the size at which it does several jobs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import batchnorm

SRC = Path(batchnorm.__file__).resolve().parent
PACKAGE = "batchnorm"
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, str | None]]:
    """``(module imported, name taken from it or None)`` for every import in ``name``'s file,
    inside functions too, restricted to this package."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, node, path.name == "__init__.py")
            if not target.startswith(PACKAGE):
                continue
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    found.append((f"{target}.{alias.name}", None))
                else:
                    found.append((target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith(PACKAGE)]
    return found


def _attribute_uses(name: str) -> list[tuple[str, str]]:
    """``(module, attribute)`` for ``alias.attribute`` where ``alias`` is an imported module."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, node, path.name == "__init__.py")
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
    return [
        (aliases[node.value.id], node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
    ]


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def _private(attribute: str) -> bool:
    return attribute.startswith("_") and not attribute.startswith("__")


def test_no_module_uses_another_modules_private_names():
    crossings = []
    for name in MODULES:
        uses = [(m, a) for m, a in _imports(name) if a is not None] + _attribute_uses(name)
        for target, attribute in uses:
            same_subpackage = _subpackage(name) and _subpackage(name) == _subpackage(target)
            if target != name and _private(attribute) and not same_subpackage:
                crossings.append(f"{name} -> {target}.{attribute}")
    assert crossings == []


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for target, _ in _imports(name):
            # "from . import x" names a module; the package __init__ itself is not an edge.
            if target in MODULES and target != PACKAGE and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    # The check above can fail: a two-module loop is reported.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


# module -> modules of this package it must not import (data flows one way)
DOWNWARD_ONLY = {
    "batchnorm.kernels": {"batchnorm.functional", "batchnorm.modules", "batchnorm.stats"},
    # The family table imports no layer: the layer modules register themselves in it.
    "batchnorm.families": {m for m in MODULES if m not in ("batchnorm", "batchnorm.families")},
    "batchnorm.stats": {"batchnorm.functional", "batchnorm.modules"},
    "batchnorm.routing": {"batchnorm.functional", "batchnorm.modules", "batchnorm._stages"},
    "batchnorm._stages": {"batchnorm.functional", "batchnorm._autograd"},
    "batchnorm._autograd": {"batchnorm.functional"},
    "batchnorm.functional": {
        "batchnorm.modules",
        "batchnorm.distributed",
        "batchnorm.frozen",
        "batchnorm.tools",
    },
    "batchnorm.modules": {"batchnorm.distributed", "batchnorm.frozen", "batchnorm.tools"},
    "batchnorm.frozen": {"batchnorm.tools"},
}


@pytest.mark.parametrize("source", sorted(DOWNWARD_ONLY))
def test_imports_go_down_the_layers(source):
    graph = _graph()
    own = [m for m in MODULES if m == source or m.startswith(source + ".")]
    bad = [
        f"{m} -> {t}"
        for m in own
        for t in graph[m]
        for forbidden in DOWNWARD_ONLY[source]
        if t == forbidden or t.startswith(forbidden + ".")
    ]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_source_files_stay_below_the_size_of_several_jobs(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"
