#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up .venv, then
#   1. ruff check (lint rules in pyproject.toml),
#   2. the kernel tests with NUMBA_DISABLE_JIT=1, so that the kernels' bodies run as plain
#      Python (they are then visible to tracebacks and coverage tools),
#   3. the full pytest suite, compiled kernels included. Its summary line closes the output.
# Every step runs even if an earlier one failed; the script exits non-zero if any failed.
# Extra arguments go to the full pytest run, e.g. `bash scripts/test.sh -x -k demo`.
# With CI set, tests/conftest.py picks the derandomized hypothesis profile.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh || exit 1
# The report's browser test opens headless Chromium; it fails rather than skips without it.
bash scripts/setup_browser.sh || exit 1
VENV_PY=.venv/bin/python
failed=()

lint_paths=(src tests)
[ -d benchmarks ] && lint_paths+=(benchmarks)
[ -d examples ] && lint_paths+=(examples)
echo "== ruff check ${lint_paths[*]}"
"$VENV_PY" -m ruff check "${lint_paths[@]}" || failed+=("ruff check")

if [ -d tests/kernels ]; then
    echo "== NUMBA_DISABLE_JIT=1 pytest tests/kernels"
    NUMBA_DISABLE_JIT=1 "$VENV_PY" -m pytest tests/kernels -q -p no:cacheprovider \
        || failed+=("pytest tests/kernels (NUMBA_DISABLE_JIT=1)")
fi

echo "== pytest tests"
"$VENV_PY" -m pytest tests "$@" || failed+=("pytest tests")

if [ ${#failed[@]} -gt 0 ]; then
    printf 'test.sh: expected every step to pass, got failures in: %s\n' \
        "$(IFS=';'; echo "${failed[*]}" | sed 's/;/; /g')" >&2
    exit 1
fi
