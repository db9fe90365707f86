#!/usr/bin/env bash
# Set-up + the main job: pre-train the tiny LLaMA on the bundled Shakespeare corpus with
# AdamW (at the learning rate the rank sweep found best), GaLore and Fira at the tiny preset's
# rank, a rank at which the subspace misses part of the gradient, then write
# runs/compare/results.md (with one sentence on what the run shows) and loss_curves.png.
# Extra arguments go to compare.py, e.g. --config.data_path=DIR_OR_FILE for another corpus,
# --config.num_train_steps=20 for a quick check, --mesh=fsdp=4,tensor=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# XLA:CPU runs this model ~5 % faster with the sequential scheduler (docs/performance.md).
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_enable_concurrency_optimized_scheduler=false}"
.venv/bin/python -m examples.llama_pretrain.compare \
  --config=examples/llama_pretrain/configs.py:tiny --workdir=runs/compare "$@"
