"""The API reference (docs/api) builds with warnings as errors and lists every public name.

The build is the one the README gives (``python -m sphinx -W --keep-going -b html docs/api
OUT``), into a temporary folder, run once for the module; it takes about 7 s. Sphinx runs in a
subprocess so that its imports and registries stay out of the test process.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "docs" / "api"
PACKAGE = REPO / "src"

# module -> the page (docs/api/<page>.rst) that documents it through its __all__.
PAGES = {
    "batchnorm": "batchnorm",
    "batchnorm.functional": "functional",
    "batchnorm.distributed": "distributed",
    "batchnorm.tools": "tools",
    "batchnorm.activations": "tables",
    "batchnorm.families": "tables",
    "batchnorm.lab": "lab",
    "batchnorm.lightning": "lightning",
}
# Pages that document no module's __all__: the layers' base classes (their shared methods).
OTHER_PAGES = ["bases"]


def public_names(module: str) -> list[str]:
    """``module.__all__``, read from the source (importing lightning here would cost seconds)."""
    path = PACKAGE.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path}: no __all__")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    done = subprocess.run(
        [*command, str(SOURCE), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"sphinx failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_entry_page_links_every_page(built):
    index = (built / "index.html").read_text(encoding="utf-8")
    for page in sorted({*PAGES.values(), *OTHER_PAGES}):
        assert (built / f"{page}.html").is_file(), page
        assert f'href="{page}.html"' in index, page


@pytest.mark.parametrize("module", sorted(PAGES))
def test_every_public_name_is_documented(built, module):
    page = (built / f"{PAGES[module]}.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="([^"]+)"', page))
    names = public_names(module)
    missing = [name for name in names if f"{module}.{name}" not in anchors]
    assert not missing, f"{module}: not on {PAGES[module]}.html: {missing}"


def test_layer_methods_are_documented(built):
    page = (built / "bases.html").read_text(encoding="utf-8")
    assert 'id="batchnorm.modules.BatchNormBase.forward"' in page


def test_math_is_rendered_by_mathjax(built):
    page = (built / "batchnorm.html").read_text(encoding="utf-8")
    assert 'class="math' in page  # the BatchNorm formula, among others
    assert "mathjax" in page.lower()  # the script is referenced by URL, not fetched at build
