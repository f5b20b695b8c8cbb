#!/usr/bin/env bash
# Create .venv in the repository and install batchnorm into it, editable, with the test and lab
# extras. Needs only python3 >= 3.10. Safe to run again: a venv that is already set up for the
# current pyproject.toml and this script is left as it is (a second run takes about a second).
#
# torch is pinned here, and only here: the package itself depends on a range, but an unpinned
# install would resolve to the multi-GB CUDA build, while torch==2.13.0 resolves to the CPU
# wheel the machine's pip configuration points at. Installing it first, and passing the pin
# again with the package, keeps pip from ever replacing it.
set -euo pipefail

TORCH_PIN="torch==2.13.0"
PYTHON="${PYTHON:-python3}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup.sh: expected a Python interpreter named $PYTHON, got none on PATH." \
        "Install Python 3.10 or newer, or set PYTHON=/path/to/python3." >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup.sh: expected Python >= 3.10, got $("$PYTHON" -V 2>&1) ($PYTHON)." \
        "Set PYTHON=/path/to/python3.10-or-newer." >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup.sh: creating .venv with $("$PYTHON" -V 2>&1)"
    if ! "$PYTHON" -m venv .venv; then
        echo "setup.sh: expected '$PYTHON -m venv' to work, got the error above." \
            "On Debian/Ubuntu: apt-get install python3-venv." >&2
        exit 1
    fi
fi
VENV_PY=.venv/bin/python

# The stamp records what the venv was last set up for; the check below also confirms that
# torch and batchnorm are still installed at the versions expected.
stamp_file=.venv/.batchnorm-setup
stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_PIN"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
    && "$VENV_PY" - "$TORCH_PIN" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

import re

wanted = sys.argv[1].split("==")[1]
# The installed metadata must carry the source's version (bumped in __init__.py alone).
source = re.search(r'^__version__ = "([^"]+)"', open("src/batchnorm/__init__.py").read(), re.M)
try:
    ok = version("torch").split("+")[0] == wanted and version("batchnorm") == source.group(1)
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
then
    echo "setup.sh: .venv is up to date"
    exit 0
fi

echo "setup.sh: installing $TORCH_PIN, then batchnorm[test,lab,tensorboard,lightning,docs] (editable) into .venv"
"$VENV_PY" -m pip install -qq --progress-bar off "$TORCH_PIN"
"$VENV_PY" -m pip install -qq --progress-bar off -e ".[test,lab,tensorboard,lightning,docs]" "$TORCH_PIN"
echo "$stamp" >"$stamp_file"
echo "setup.sh: done ($("$VENV_PY" -c 'import torch; print("torch", torch.__version__)'))"
