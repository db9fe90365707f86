#!/usr/bin/env bash
# Set-up + the main job: pre-train the tiny LLaMA on the bundled Shakespeare corpus with
# AdamW, GaLore and Fira, then write runs/compare/results.md and loss_curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m examples.llama_pretrain.compare --config tiny --workdir runs/compare "$@"
