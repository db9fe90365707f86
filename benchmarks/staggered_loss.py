"""Official vs staggered refresh schedule on the example's tiny LLaMA: the loss difference.

    .venv/bin/python -m benchmarks.staggered_loss [--config tiny] [--steps N] [--gap T]

Builds the model, data and schedule of `examples/llama_pretrain` (the preset's settings,
Shakespeare) and trains it with `fo.fira` exactly as the example's `make_optimizer` does,
once with `refresh_schedule="official"` and once with `"staggered"` (same seed, same
batches), then prints both final validation losses over the whole validation split (every
target token once, as the example's final evaluation) and their difference. `--seeds 0,1`
repeats it per seed (model init and batch order), to compare the difference with the
seed-to-seed spread. (The runs are sequential: step times are not compared here; see
`refresh_scaling.py` for interleaved step times.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import numpy as np
import optax
from flax import nnx

import fira_optax as fo
from examples.llama_pretrain import configs, input_pipeline, train
from examples.llama_pretrain.model import Llama


def make_tx(cfg, schedule: str) -> optax.GradientTransformation:
    """The example's `fira` optimizer (train.make_optimizer) with the refresh schedule."""
    tx = fo.fira(
        train.make_schedule(cfg),
        cfg.rank,
        gamma=cfg.gamma,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.scale,
        proj_type=cfg.proj_type,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        refresh_schedule=schedule,
    )
    if cfg.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


def run(cfg, dataset, schedule: str) -> dict:
    model = Llama(cfg, rngs=nnx.Rngs(cfg.seed))
    optimizer = nnx.Optimizer(model, make_tx(cfg, schedule), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens_AxBxL1):
        def loss_of(model):
            losses = [train.loss_fn(model, tokens) for tokens in tokens_AxBxL1]
            return sum(losses) / len(losses)

        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def evaluate(model, tokens_BxL1):
        return train.loss_fn(model, tokens_BxL1)

    losses = []
    for t in range(cfg.num_train_steps):
        losses.append(float(step(model, optimizer, dataset.train_batch(cfg, t))))
    total, tokens = 0.0, 0
    for batch in dataset.full_val_batches(cfg):
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(evaluate(model, batch)) * n
        tokens += n
    return {"val_loss": total / tokens, "train_loss_last_10": float(np.mean(losses[-10:]))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--gap", type=int, default=None)
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the preset's)")
    args = parser.parse_args()
    cfg = configs.preset(args.config)
    if args.steps:
        cfg = dataclasses.replace(cfg, num_train_steps=args.steps)
    if args.gap:
        cfg = dataclasses.replace(cfg, update_proj_gap=args.gap)
    dataset = input_pipeline.load_dataset(cfg)
    cfg = dataclasses.replace(cfg, vocab_size=dataset.vocab_size)
    print(
        f"config {args.config}: {cfg.num_train_steps} steps of {cfg.batch_size}×"
        f"{cfg.grad_accum_steps}×{cfg.max_seq_len} tokens, rank {cfg.rank}, "
        f"T = {cfg.update_proj_gap}, α {cfg.scale}, lr {cfg.learning_rate}; jax "
        f"{jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    seeds = [cfg.seed] if args.seeds is None else [int(x) for x in args.seeds.split(",")]
    print("\n| seed | schedule | final val loss (whole split) | train loss (last 10) |")
    print("|---:|---|---:|---:|")
    diffs = []
    for seed in seeds:
        cfg_seed = dataclasses.replace(cfg, seed=seed)
        results = {s: run(cfg_seed, dataset, s) for s in ("official", "staggered")}
        for schedule, r in results.items():
            print(
                f"| {seed} | {schedule} | {r['val_loss']:.4f} | {r['train_loss_last_10']:.4f} |",
                flush=True,
            )
        diffs.append(results["staggered"]["val_loss"] - results["official"]["val_loss"])
    print("\nstaggered − official final val loss: " + ", ".join(f"{d:+.4f}" for d in diffs))


if __name__ == "__main__":
    main()
