"""Sparse gradients: a 2-layer MLP on one-hot tokens, trained by Fira, GaLore, Adam and the
official PyTorch Fira / GaLore from the same initial weights and token order.

The first layer's gradient sits on one row (the token's), so after a refresh it is mostly
orthogonal to the rank-r basis (`R = 0` with `G ≠ 0`). Prints, per optimizer, the steps on
which `w1` had a non-zero gradient but an exactly zero update ("frozen") and the final mean
loss over the 16 tokens (ln 16 = 2.77 at chance).

    python -m benchmarks.sparse_gradients [--rank 2] [--gap 20] [--steps 300] [--seeds 0,1,2]

At rank ≥ 2 the gradient (rank 1, batch 1) has one singular vector and a null space: the
rest of the basis is whatever the SVD returns, so the official code and ours may pick
different bases there and end at different losses. At rank 1 the basis is unique and both
train the same model.
"""

from __future__ import annotations

import argparse
import statistics

import optax

import fira_optax as fo
from fira_optax import _testing
from tests import _sparse  # the official PyTorch runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    projected = {"w1": True, "w2": True}
    low_rank = dict(rank=args.rank, update_proj_gap=args.gap)
    runs = {
        "fo.fira": lambda seed: _testing.sparse_train(
            fo.fira(args.lr, projected=projected, **low_rank), seed, args.steps
        ),
        "fo.galore": lambda seed: _testing.sparse_train(
            fo.galore(args.lr, projected=projected, **low_rank), seed, args.steps
        ),
        "optax.adam": lambda seed: _testing.sparse_train(optax.adam(args.lr), seed, args.steps),
        "official FiraAdamW": lambda seed: _sparse.train_torch(
            "fira", seed, args.steps, lr=args.lr, **low_rank
        ),
        "official GaLoreAdamW": lambda seed: _sparse.train_torch(
            "galore", seed, args.steps, lr=args.lr, **low_rank
        ),
    }
    print(
        f"MLP 16→64→16 on one-hot tokens, batch 1, rank {args.rank}, gap {args.gap}, "
        f"lr {args.lr:g}, {args.steps} steps, seeds {seeds}"
    )
    print(f"| optimizer | frozen steps of w1 (of {args.steps}) | final loss (mean over seeds) |")
    print("|---|---:|---:|")
    for name, run in runs.items():
        results = [run(seed) for seed in seeds]
        frozen = ", ".join(str(r["frozen"]) for r in results)
        losses = [r["loss"] for r in results]
        detail = ", ".join(f"{x:.4f}" for x in losses)
        print(f"| {name} | {frozen} | {statistics.mean(losses):.4f} ({detail}) |")


if __name__ == "__main__":
    main()
