"""The package as a user gets it: the wheel and sdist that ``python -m build`` makes.

The rest of the suite runs against the editable install in the repository, which sees every file
of the source tree whether or not the wheel ships it. Here the standard build front end builds
the sdist and, from that sdist, the wheel (as pip would), into a temporary directory; then

- a cheap test checks the archives' file lists: every module and every data file of
  ``src/batchnorm`` (e.g. ``lab/tuned.json``) in the wheel, ``py.typed`` and ``LICENSE`` when
  the source tree has them, ``src/batchnorm`` in the sdist;
- a slow test installs the wheel (not editable, with its ``lab`` extra) into a fresh venv
  outside the repository, with torch from the same local CPU wheel that ``scripts/setup.sh``
  installs, and runs ``tests/_wheel_smoke.py`` there from a directory outside the repository:
  the import, a training step of each layer family against torch.nn, ``recompute_statistics``,
  ``batchnorm info``, ``batchnorm lab list`` and a tiny lab run.

The build uses build isolation (hatchling comes from the configured package index), as a user's
pip does. Timing on the 2-core dev machine: the build 5-9 s (the cheap test); the slow test
70 s more when the machine is idle (venv and installs about 45 s, the smoke script about 25 s),
about 120 s with other work sharing the cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / "batchnorm"
SMOKE = Path(__file__).with_name("_wheel_smoke.py")
# The pin of scripts/setup.sh: the CPU wheel that the machine's pip configuration resolves.
TORCH_PIN = re.search(
    r'^TORCH_PIN="([^"]+)"', (REPO / "scripts" / "setup.sh").read_text(), re.M
).group(1)
# Build and cache by-products that .gitignore keeps out of the archives.
IGNORED_SUFFIXES = (".pyc", ".pyo", ".nbi", ".nbc")


def _source_version() -> str:
    text = (SOURCE / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _package_files() -> set[str]:
    """Every file of the source package that an installed copy needs, relative to ``src``."""
    files = set()
    for path in SOURCE.rglob("*"):
        if (
            path.is_file()
            and "__pycache__" not in path.parts
            and not path.name.endswith(IGNORED_SUFFIXES)
        ):
            files.add(path.relative_to(SOURCE.parent).as_posix())
    return files


def _run(command: list, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, (
        f"expected exit 0 from {' '.join(map(str, command))}, got {done.returncode}\n"
        f"--- stdout\n{done.stdout[-5000:]}\n--- stderr\n{done.stderr[-5000:]}"
    )
    return done


def _clean_env() -> dict[str, str]:
    """The environment minus anything that would let the repository's code leak in."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH"):
        env.pop(name, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built once for this module."""
    out = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        timeout=600,
        cwd=out,
        env=_clean_env(),
    )
    version = _source_version()
    wheel = out / f"batchnorm-{version}-py3-none-any.whl"
    sdist = out / f"batchnorm-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), f"build wrote {sorted(os.listdir(out))}"
    return {"wheel": wheel, "sdist": sdist}


def _check_wheel(wheel: Path) -> None:
    version = _source_version()
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"batchnorm-{version}.dist-info/METADATA").decode()
    dist_info = f"batchnorm-{version}.dist-info/"
    shipped = {name for name in names if name.startswith("batchnorm/")}

    missing = sorted(_package_files() - shipped)
    assert not missing, f"the wheel leaves out package files: {missing}"
    stray = sorted(n for n in names if not n.startswith(("batchnorm/", dist_info)))
    assert not stray, f"the wheel ships files outside the package: {stray}"
    compiled = sorted(n for n in shipped if "__pycache__" in n or n.endswith(IGNORED_SUFFIXES))
    assert not compiled, f"the wheel ships caches: {compiled}"

    # Conditional on the source tree so that the test does not run ahead of the files.
    if (SOURCE / "py.typed").is_file():
        assert "batchnorm/py.typed" in names
    if (REPO / "LICENSE").is_file():
        assert f"{dist_info}licenses/LICENSE" in names, sorted(
            n for n in names if n.startswith(dist_info)
        )
    assert re.search(rf"^Version: {re.escape(version)}$", metadata, re.M)
    assert re.search(r"^Requires-Dist: torch", metadata, re.M)
    assert "batchnorm = batchnorm.cli:main" in (
        zipfile.ZipFile(wheel).read(f"{dist_info}entry_points.txt").decode()
    )


def _check_sdist(sdist: Path) -> None:
    root = f"batchnorm-{_source_version()}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(root) for name in archive.getnames()}
    missing = sorted({f"src/{name}" for name in _package_files()} - names)
    assert not missing, f"the sdist leaves out package files: {missing}"
    for needed in ("pyproject.toml", "README.md"):
        assert needed in names
    if (REPO / "LICENSE").is_file():
        assert "LICENSE" in names
    # The tests are not needed to build or install; the sdist must not carry local state.
    leaked = sorted(n for n in names if n.split("/")[0] in {".venv", "runs", "dist", "build"})
    assert not leaked, f"the sdist carries local files: {leaked[:20]}"


def test_wheel_and_sdist_hold_every_package_file(dists):
    _check_wheel(dists["wheel"])
    _check_sdist(dists["sdist"])


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(dists, tmp_path):
    """The full path of a user: build, install into a new venv, use it, outside the repo."""
    _check_wheel(dists["wheel"])
    _check_sdist(dists["sdist"])

    assert REPO not in tmp_path.resolve().parents, "the scratch directory is in the repository"
    venv = tmp_path / "venv"
    env = _clean_env()
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-qq", "--progress-bar", "off"]
    # torch first, then the wheel with the pin repeated, so that pip never swaps torch (as
    # scripts/setup.sh does).
    _run([*pip, TORCH_PIN], timeout=900, cwd=tmp_path, env=env)
    _run([*pip, f"{dists['wheel']}[lab]", TORCH_PIN], timeout=900, cwd=tmp_path, env=env)

    # The smoke script runs from a copy in the scratch directory, so that no path of the
    # repository is on sys.path.
    work = tmp_path / "work"
    work.mkdir()
    script = shutil.copy(SMOKE, work / SMOKE.name)
    done = _run(
        [str(python), str(script), str(REPO), str(tmp_path / "lab")],
        timeout=900,
        cwd=work,
        env=env,
    )
    assert "smoke: all checks passed" in done.stdout, done.stdout
