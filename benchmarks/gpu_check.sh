#!/usr/bin/env bash
# One short check for a machine with a GPU (no internet: uses whichever python has jax[cuda]).
#   bash benchmarks/gpu_check.sh            # tests without torch + step timing on 60m/350m
# Env: PYTHON (default: .venv/bin/python if it sees a GPU, else python3), ROUNDS (30),
#      SIZES (60m,350m), TEST_TIMEOUT (240 s), BENCH_TIMEOUT (300 s).
set -uo pipefail
cd "$(dirname "$0")/.."

has_gpu() { "$1" -c 'import jax,sys; sys.exit(0 if jax.default_backend()=="gpu" else 1)' 2>/dev/null; }
if [[ -z "${PYTHON:-}" ]]; then
  for cand in .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && has_gpu "$cand"; then PYTHON=$cand; break; fi
  done
fi
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-30}
SIZES=${SIZES:-60m,350m}
OUT=${OUT:-/tmp}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c 'import jax, optax; print("jax", jax.__version__, "optax", optax.__version__, jax.devices())'
has_gpu "$PYTHON" || echo "WARNING: $PYTHON's jax does not see a GPU; timings below are CPU timings"

echo "== tests without torch"
# Test files that need torch / the official packages (import torch or tests/_official.py).
ignores=()
for f in tests/test_*.py; do
  if grep -qE '^\s*(import torch|from _official|import _official|from tests._official)' "$f"; then
    ignores+=("--ignore=$f")
  fi
done
echo "skipping: ${ignores[*]:-none}"
timeout "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest tests -q -x -p no:cacheprovider \
  -m "not slow" "${ignores[@]}" 2>&1 | tail -15
echo "pytest exit: ${PIPESTATUS[0]}"

echo "== update step time (JAX only)"
rm -f "$OUT/gpu_step_time.md"
timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" -m benchmarks.step_time --sizes "$SIZES" --no-torch \
  --rounds "$ROUNDS" --refresh-rounds 5 --out "$OUT/gpu_step_time.md" > "$OUT/gpu_step_time.log" 2>&1
echo "step_time exit: $?"
if [[ -s "$OUT/gpu_step_time.md" ]]; then cat "$OUT/gpu_step_time.md"; else tail -30 "$OUT/gpu_step_time.log"; fi

echo "== compiled update memory (LLaMA-60M tree) on this backend"
timeout "${MEM_TIMEOUT:-180}" "$PYTHON" benchmarks/memory.py 2>&1 | sed -n '/### Measured/,/### Analytic/p' | head -14
