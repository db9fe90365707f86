#!/usr/bin/env bash
# Set-up, lint, the docs build and the whole test suite (slow tests and notebooks included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# No arguments: the docs (warnings are errors; a public name missing from docs/api.md fails),
# then the whole suite over min(4, cores) pytest-xdist workers (2 on CI: about 11 min).
# With arguments, pytest runs exactly them (add -n 2 to parallelize; -s prints).
if [ "$#" -eq 0 ]; then
  # -E: read every page again (the API page comes from docstrings that may have changed).
  .venv/bin/sphinx-build -q -E -W --keep-going -b html docs docs/_build/html
  set -- -n "$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')"
fi
.venv/bin/python -m pytest "$@"
