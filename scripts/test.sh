#!/usr/bin/env bash
# Set-up + the whole test suite (slow tests included), lint and notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
