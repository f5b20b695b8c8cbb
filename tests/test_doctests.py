"""The docstring examples are part of the documentation, so they run as tests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "batchnorm.reference",
    "batchnorm.stats",
    "batchnorm.functional",
    "batchnorm.modules",
    "batchnorm.tools.convert",
    "batchnorm.frozen",
    "batchnorm.tools.freeze",
    "batchnorm.tools.fold",
    "batchnorm.tools.population",
    "batchnorm.distributed",
    "batchnorm.routing",
    "batchnorm.families",
    "batchnorm.activations",
    "batchnorm.activated",
    "batchnorm.tools.fuse",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0
