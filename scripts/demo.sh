#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then run `batchnorm demo` (extra arguments are
# passed on, e.g. `bash scripts/demo.sh --epochs 5`). Exits with the demo's status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/batchnorm demo "$@"
