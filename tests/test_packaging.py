"""Package-level rules: public modules, print-free library code, lazy compilation, docstrings.

These check the house style (b.1, b.3, b.7, b.8) over the whole package rather than one unit, so
that a new module is covered without anyone remembering to add it here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import batchnorm

PACKAGE_DIR = Path(batchnorm.__file__).resolve().parent
REPO = PACKAGE_DIR.parents[1]
# The two modules allowed to write to the terminal (house style b.1).
PRINT_ALLOWED = {PACKAGE_DIR / "cli.py", PACKAGE_DIR / "lab" / "runner.py"}


def _all_module_names() -> list[str]:
    names = ["batchnorm"]
    for info in pkgutil.walk_packages(batchnorm.__path__, prefix="batchnorm."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it would be harmless, but
            names.append(info.name)  # it is the program, not a module
    return sorted(names)


def _is_public(module_name: str) -> bool:
    return not any(part.startswith("_") for part in module_name.split("."))


PUBLIC_MODULES = [name for name in _all_module_names() if _is_public(name)]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_defines_all_with_existing_names(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    exported = list(module.__all__)
    assert all(isinstance(n, str) for n in exported), f"{name}.__all__ holds a non-string"
    assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names undefined attributes: {missing}"


def test_no_print_calls_in_library_code():
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path in PRINT_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                offenders.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}")
    assert not offenders, f"print() outside cli.py/lab/runner.py (use logging): {offenders}"


# A fresh interpreter imports the whole package while Numba's compile events are recorded, then
# lists every Numba dispatcher in the package that holds a compiled signature. As a control, it
# compiles one throwaway function and reports whether the recorder saw that.
_IMPORT_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import numba
    from numba.core import event
    from numba.core.dispatcher import Dispatcher

    with event.install_recorder("numba:compile") as rec:
        import batchnorm
        for info in pkgutil.walk_packages(batchnorm.__path__, prefix="batchnorm."):
            if not info.name.endswith(".__main__"):
                importlib.import_module(info.name)
        import_events = len(rec.buffer)
    compiled = sorted(
        f"{mod_name}.{attr}"
        for mod_name, mod in list(sys.modules.items())
        if mod_name == "batchnorm" or mod_name.startswith("batchnorm.")
        for attr, obj in vars(mod).items()
        if isinstance(obj, Dispatcher) and obj.signatures
    )
    with event.install_recorder("numba:compile") as control:
        numba.njit(lambda v: v + 1)(1)
    print(json.dumps({"import_events": import_events, "compiled": compiled,
                      "control_events": len(control.buffer)}))
    """
)


@pytest.mark.skipif(
    "numba" in sys.modules and sys.modules["numba"].config.DISABLE_JIT,
    reason="nothing compiles with NUMBA_DISABLE_JIT=1",
)
def test_import_compiles_no_numba_kernels():
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["control_events"] > 0, "the compile-event recorder saw nothing: probe broken"
    assert report["compiled"] == [], "compiled at import time (eager signatures?)"
    assert report["import_events"] == 0, "Numba compiled something while importing batchnorm"


# A str.format replacement field left in a docstring: `{name}`, `{name.attr}`, `{name[k]}`,
# `{0}`, optionally with `!r` or `:spec`. LaTeX braces do not match: they follow a command or
# another group (`\hat{x}`, `\frac{1}{m}`), a sub/superscript (`x_{i}`, `x^{2}`), or do not hold
# a bare identifier (`{x - \mu_B}`).
_PLACEHOLDER = re.compile(
    r"(?<![\\\w^}])\{(?:[A-Za-z_]\w*(?:\.\w+|\[[^\]{}]*\])*|\d+)(?:![rsa])?(?::[^{}]*)?\}"
)


def _placeholders(doc: str | None) -> list[str]:
    return _PLACEHOLDER.findall(doc or "")


@pytest.mark.parametrize(
    "text",
    ["shape ``{shape}``", "{name!r}", "{0}", "{cls.__name__}", "{d[key]}", "{x:>10}"],
)
def test_placeholder_pattern_flags_format_fields(text):
    assert _placeholders(text) == [text[text.index("{") : text.rindex("}") + 1]]


@pytest.mark.parametrize(
    "text",
    [
        r"\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}",
        r"\hat{x}_i = \frac{1}{m}",
        r"x_{i} + \sigma^{2} + \mathrm{Var}[x]",
        '>>> d = {"a": 1}',
        "an empty dict ``{}``",
    ],
)
def test_placeholder_pattern_ignores_latex_and_literals(text):
    assert _placeholders(text) == []


def _documented_objects():
    """Yield ``(qualified name, object)`` for everything whose docstring a user reads.

    That is every public module, every class or function its ``__all__`` exports, and the
    public methods and properties of those classes; only objects defined in batchnorm (an
    inherited torch method carries torch's docstring, not ours).
    """
    seen = set()
    for mod_name in PUBLIC_MODULES:
        module = importlib.import_module(mod_name)
        yield mod_name, module
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr, None)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("batchnorm") or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{mod_name}.{attr}", obj
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    if member_name.startswith("_") and member_name != "__init__":
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if inspect.isroutine(member) or isinstance(member, property):
                        yield f"{mod_name}.{attr}.{member_name}", member


def test_public_docstrings_have_no_format_placeholders():
    objects = list(_documented_objects())
    assert any(name == "batchnorm.BatchNorm2d" for name, _ in objects), "walk found no API"
    leftovers = {name: _placeholders(obj.__doc__) for name, obj in objects}
    leftovers = {name: fields for name, fields in leftovers.items() if fields}
    assert not leftovers, f"unformatted docstring placeholders: {leftovers}"


def test_console_script_runs_cli_main():
    from batchnorm import cli

    scripts = metadata.entry_points(group="console_scripts")
    (entry,) = [ep for ep in scripts if ep.name == "batchnorm"]
    assert entry.value == "batchnorm.cli:main"
    assert entry.load() is cli.main


def test_installed_version_is_package_version():
    # The version is set once, in __init__.py; the installed metadata reads it from there.
    assert metadata.version("batchnorm") == batchnorm.__version__


_needs_source_tree = pytest.mark.skipif(
    not (REPO / "pyproject.toml").is_file(), reason="needs the source tree (editable install)"
)


@_needs_source_tree
def test_runtime_dependencies_are_ranges_and_torch_pin_lives_in_setup_script():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    # The core and its progress bar; everything else is an extra.
    assert names == {"torch", "numpy", "numba", "tqdm"}
    pinned = [dep for dep in project["dependencies"] if "==" in dep]
    assert not pinned, f"runtime dependencies must be ranges, got pins {pinned}"
    assert set(project["optional-dependencies"]) >= {"lab", "test", "bench"}
    assert project["scripts"] == {"batchnorm": "batchnorm.cli:main"}
    holders = [
        str(p.relative_to(REPO))
        for p in [*REPO.glob("scripts/*"), *REPO.glob("requirements*"), REPO / ".ci" / "run"]
        if p.is_file() and "torch==" in p.read_text(encoding="utf-8")
    ]
    assert holders == ["scripts/setup.sh"], f"the torch pin must live in one place: {holders}"


@_needs_source_tree
def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]
    assert commands == ["exec bash scripts/test.sh"]
    assert "bash scripts/test.sh" in readme
