#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then run every lab experiment at the quick
# preset, `batchnorm lab run all --preset quick`, into runs/lab-quick-<timestamp>/ (minutes on
# 2 cores; seeds run in parallel processes). Prints the claims table (one row per
# claim: what was measured, the effect with its spread, the seeds that agree, the verdict) and
# the path of report.html, one self-contained page with every figure. Extra arguments are
# passed on and win over the defaults, e.g. `bash scripts/lab.sh --preset full` (the record,
# under two hours) or `--out DIR` (the same command again continues an interrupted run there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/batchnorm lab run all --preset quick "$@"
