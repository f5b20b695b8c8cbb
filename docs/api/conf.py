"""Sphinx configuration of the API reference of ``batchnorm`` (issue 20).

Why Sphinx with autodoc and napoleon rather than mkdocs with mkdocstrings: the docstrings are
Google style (``Args:``, ``Returns:``, ``Raises:``) and write their math in reST roles and
directives (``:math:`` and ``.. math::``). Napoleon turns the Google sections into reST and
Sphinx renders the math natively; mkdocstrings reads Markdown and would need extra plugins to
render reST math. Every page documents a module through its ``__all__``, so the reference
lists exactly the public names. autodoc documents a module-level constant only when it has a
``#:`` doc comment in that very module, so the pages name the public constants
(``__version__``, the ``ACTIVATIONS`` tables, ``ORIGINAL_CLASS``, ``EXPERIMENTS``) with an
explicit ``autodata`` directive and keep them out of ``automodule``, which would otherwise
document one twice as soon as it gets such a comment.

Math is rendered by MathJax in the reader's browser (``sphinx.ext.mathjax``): the build only
writes the script's URL into the pages and fetches nothing, so it runs offline. ``imgmath``
is not used: it needs LaTeX.

Build (from the repository root), warnings as errors::

    python -m sphinx -W --keep-going -b html docs/api docs/_build/api

The entry page is then ``docs/_build/api/index.html``.
"""

from __future__ import annotations

import os
import sys

# The package is imported from the source tree, so the reference describes this checkout
# even when it is not installed (an editable install finds the same files).
_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(_ROOT, "src"))

import batchnorm  # noqa: E402

project = "batchnorm"
author = "batchnorm contributors"
copyright = "batchnorm contributors"
release = batchnorm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Google-style docstrings only; NumPy style is not used in this package.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
# Signatures keep the annotations as written; the parameter lists are in the docstrings.
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"

# Names are shown with the module whose page documents them through its ``__all__``
# (``batchnorm.BatchNorm2d``, not ``batchnorm.modules.BatchNorm2d``): the import path users write.
add_module_names = True

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"batchnorm {release} API reference"
html_show_sourcelink = False


def _drop_type_docstring(app, what, name, obj, options, lines):
    """Give a constant no docstring rather than its type's (``str``'s, ``dict``'s).

    For a module-level constant without a ``#:`` comment autodoc falls back to
    ``obj.__doc__``, which for an instance of a built-in type is the type's docstring; the
    page's own text (in the ``autodata`` directive) is what describes the constant.
    """
    if what == "data" and getattr(obj, "__doc__", None) == getattr(type(obj), "__doc__", None):
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _drop_type_docstring)
