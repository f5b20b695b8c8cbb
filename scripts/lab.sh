#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then reproduce the paper's Figure 1 with the
# quick preset, `batchnorm lab run figure1 --preset quick` (about a minute on 2 cores). Writes
# runs/figure1/<timestamp>/ (figures/figure1.png, summary.md, ...) and prints whether the
# paper's claims held. Extra arguments are passed on and win over the defaults, e.g.
# `bash scripts/lab.sh --preset paper`, `--seeds 5`, `--dataset digits`, `--resume`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/batchnorm lab run figure1 --preset quick "$@"
