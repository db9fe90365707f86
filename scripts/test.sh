#!/usr/bin/env bash
# Set-up + the whole test suite (slow tests included), lint and notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# No arguments: the whole suite, over min(4, cores) pytest-xdist workers (2 on CI: 12 min
# instead of 16). With arguments, pytest runs exactly them (add -n 2 to parallelize; -s prints).
if [ "$#" -eq 0 ]; then
  set -- -n "$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')"
fi
.venv/bin/python -m pytest "$@"
