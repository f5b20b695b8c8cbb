"""mypy is clean on the package (issue 20): the type hints users' editors show are checked.

The configuration is pyproject.toml's ``[tool.mypy]`` (``files = ["src/batchnorm"]``), so this
runs the same check as ``.venv/bin/mypy`` by hand, with this interpreter and its mypy (pinned
in the ``test`` extra). mypy keeps its incremental cache in ``.mypy_cache`` at the repository
root (git-ignored by mypy itself): a cold run takes ~20 s, a warm one a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_is_clean_on_the_package():
    pytest.importorskip("mypy", reason="mypy is in the test extra (scripts/setup.sh)")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mypy exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
