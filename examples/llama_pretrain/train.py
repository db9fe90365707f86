"""Training loop for the LLaMA pre-training example (AdamW, GaLore or Fira).

``train_and_evaluate(config, workdir)`` builds the model and optimizer, trains for
``config.num_train_steps`` optimizer updates and returns the final metrics. Along the way
it writes

* ``workdir/metrics.jsonl``: one JSON object per line, ``{"split": "train", ...}`` every
  ``log_every`` steps (mean loss of the interval, lr, grad norm, tokens/s) and
  ``{"split": "val", ...}`` every ``eval_every`` steps (loss, perplexity),
* ``workdir/checkpoints/<step>``: Orbax checkpoints (model + optimizer state, which
  includes the step) every ``checkpoint_every`` steps and at the end. Running again with
  the same ``workdir`` resumes from the latest one; since a training batch is a pure
  function of (seed, step) (see ``input_pipeline``), the resumed run reproduces the
  uninterrupted one,
* ``workdir/final_metrics.json``: what the function returns.

The jitted step is functional: ``nnx.split`` turns ``(model, nnx.Optimizer)`` into a
graph definition and one state pytree, the step merges them, accumulates gradients over
``grad_accum_steps`` micro-batches with ``jax.lax.scan``, calls
``optimizer.update(model, grads)`` and splits again. The state buffers are donated. The
jitted steps are cached per (graph, config), so a second run of the same config in one
process (a resume, the tests) does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from examples.llama_pretrain import input_pipeline
from examples.llama_pretrain.configs import LOW_RANK_OPTIMIZERS, OPTIMIZERS, Config
from examples.llama_pretrain.model import Llama


def make_schedule(config: Config) -> optax.Schedule:
    """Linear warm-up over ``warmup_frac`` of training, then cosine to ``final_lr_frac``."""
    peak = config.peak_lr
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=max(1, int(config.warmup_frac * config.num_train_steps)),
        decay_steps=config.num_train_steps,
        end_value=peak * config.final_lr_frac,
    )


@functools.lru_cache(maxsize=16)
def make_optimizer(config: Config) -> optax.GradientTransformation:
    """The optimizer named ``config.optimizer`` (see ``configs.OPTIMIZERS``), one schedule.

    * ``adamw``: ``optax.adamw`` at ``adamw_learning_rate``.
    * ``galore`` / ``fira``: ``fo.galore`` / ``fo.fira`` at ``learning_rate``.
    * ``fira_no_limiter`` / ``fira_no_phi``: the paper's ablations, as ``fira_optax`` block
      chains: Fira without ``limit_norm_growth``, and Fira with the residual added unscaled
      (``norm_scale_residual(scaled=False)``: phi = 1, limiter kept).
    * ``adamw_control``: ``optax.adamw`` with the projected matrices (``fo.projected_mask``)
      at ``adamw_learning_rate`` and the other leaves (embeddings, head, norms) at
      ``learning_rate``, as the low-rank optimizers train them.

    Cached per config: runs of one config in one process share the transformation, hence
    an equal ``nnx`` graph definition and the compiled steps of ``compiled_steps``.
    """
    schedule = make_schedule(config)
    common = dict(b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        tx = optax.adamw(schedule, **common)
    elif config.optimizer == "adamw_control":
        import fira_optax as fo

        rest = make_schedule(dataclasses.replace(config, optimizer="fira"))  # learning_rate

        def labels(params):
            return jax.tree.map(lambda p: "matrices" if p else "rest", fo.projected_mask(params))

        tx = optax.multi_transform(
            {"matrices": optax.adamw(schedule, **common), "rest": optax.adamw(rest, **common)},
            labels,
        )
    elif config.optimizer in LOW_RANK_OPTIMIZERS:
        import fira_optax as fo

        low_rank = dict(
            update_proj_gap=config.update_proj_gap,
            scale=config.scale,
            proj_type=config.proj_type,
            **common,
        )
        if config.optimizer == "fira":
            tx = fo.fira(schedule, config.rank, gamma=config.gamma, **low_rank)
        elif config.optimizer == "galore":
            tx = fo.galore(schedule, config.rank, **low_rank)
        else:
            residual = {
                "fira_no_limiter": [fo.norm_scale_residual()],
                "fira_no_phi": [
                    fo.norm_scale_residual(scaled=False),
                    fo.limit_norm_growth(gamma=config.gamma),
                ],
            }[config.optimizer]
            tx = optax.chain(
                fo.project(
                    rank=config.rank,
                    update_proj_gap=config.update_proj_gap,
                    scale=config.scale,
                    proj_type=config.proj_type,
                ),
                fo.scale_by_low_rank_adam(
                    b1=config.b1,
                    b2=config.b2,
                    eps=config.eps,
                    rank=config.rank,
                    proj_type=config.proj_type,
                ),
                *residual,
                fo.project_back(),
                fo.scale_by_learning_rate_and_decay(schedule, weight_decay=config.weight_decay),
            )
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    if config.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


def loss_fn(model: Llama, tokens_BxL1: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over a batch of ``max_seq_len + 1`` windows."""
    logits_BxLxV = model(tokens_BxL1[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL1[:, 1:])
    return losses.mean()


def make_train_step(graphdef: nnx.GraphDef, schedule: optax.Schedule):
    """Returns ``train_step(state, tokens_AxBxL1) -> (state, metrics)``, jitted."""

    def train_step(state: nnx.State, tokens_AxBxL1: jax.Array):
        model, optimizer = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def micro_loss(params, tokens_BxL1):
            return loss_fn(nnx.merge(model_def, params, rest), tokens_BxL1)

        def accumulate(carry, tokens_BxL1):
            loss_sum, grad_sum = carry
            loss, grads = jax.value_and_grad(micro_loss)(params, tokens_BxL1)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros(()), zeros), tokens_AxBxL1)
        num_micro = tokens_AxBxL1.shape[0]
        grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
        step = optimizer.step[...]
        optimizer.update(model, grads)
        metrics = {
            "loss": loss_sum / num_micro,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(step),
        }
        return nnx.state((model, optimizer)), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef):
    @jax.jit
    def eval_step(state: nnx.State, tokens_BxL1: jax.Array) -> jax.Array:
        model, _ = nnx.merge(graphdef, state)
        return loss_fn(model, tokens_BxL1)

    return eval_step


def create_train_state(config: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """Initial ``(graphdef, state)`` of ``(model, nnx.Optimizer)``, committed to a device."""
    model = Llama(config, rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    # Commit the state to a device, as a restored checkpoint is: jit keys its cache on
    # committed-ness, so a resumed run reuses the step compiled by an earlier run.
    return graphdef, jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


@functools.lru_cache(maxsize=16)
def compiled_steps(graphdef: nnx.GraphDef, config: Config):
    """(train_step, eval_step) for a graph and config, reused by later runs in-process."""
    return make_train_step(graphdef, make_schedule(config)), make_eval_step(graphdef)


def evaluate(eval_step, state, dataset, config: Config, full: bool = False) -> dict[str, float]:
    """Mean validation loss per target token.

    ``full=False``: the ``eval_batches`` fixed batches of ``dataset.val_batches`` (cheap,
    for the curves). ``full=True``: the whole validation split, every target token once
    (``dataset.full_val_batches``); the result does not depend on a sample or an order.
    """
    batches = dataset.full_val_batches(config) if full else dataset.val_batches(config)
    total, tokens = 0.0, 0
    for batch in batches:
        n = batch.shape[0] * (batch.shape[1] - 1)  # Target tokens in the batch.
        total += float(eval_step(state, batch)) * n
        tokens += n
    loss = total / tokens
    return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": tokens}


def tree_nbytes(tree: Any) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree)))


class MetricsWriter:
    """Appends JSON lines to ``workdir/metrics.jsonl`` (dropping rows past a resume point)."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        if path.exists():
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in keep))

    def rows(self, split: str) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["split"] == split]

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _checkpoint_manager(workdir: pathlib.Path, config: Config) -> ocp.CheckpointManager | None:
    if config.checkpoint_every <= 0:
        return None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_checkpoints_to_keep,
        create=True,
        # Synchronous saves: the step donates its input buffers right after a save.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def train_and_evaluate(config: Config, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns metrics."""
    t_start = time.perf_counter()
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    dataset = input_pipeline.load_dataset(config)
    if dataset.vocab_size != config.vocab_size:
        config = dataclasses.replace(config, vocab_size=dataset.vocab_size)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    graphdef, state = create_train_state(config)
    model, optimizer = nnx.merge(graphdef, state)  # Views, for reporting only.
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    opt_state_bytes = tree_nbytes(optimizer.opt_state)
    del model, optimizer
    print(
        f"{config.optimizer}: {num_params / 1e6:.2f}M params, "
        f"{len(dataset.train_tokens) / 1e6:.2f}M train / {len(dataset.val_tokens) / 1e6:.2f}M "
        f"val tokens from {dataset.num_documents} documents"
    )
    if config.optimizer in ("galore", "fira"):
        import fira_optax as fo

        print(fo.describe_projection(params, config.rank, proj_type=config.proj_type))

    manager = _checkpoint_manager(workdir, config)
    start_step = 0
    if manager is not None and manager.latest_step() is not None:
        start_step = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(start_step, args=ocp.args.StandardRestore(abstract))
        print(f"Resumed from {workdir / 'checkpoints'} at step {start_step}")

    train_step, eval_step = compiled_steps(graphdef, config)
    writer = MetricsWriter(workdir / "metrics.jsonl", start_step)

    step_times: list[float] = []
    compile_s = float("nan")
    interval_losses: list[float] = []
    val: dict[str, float] = {}
    train_loss = float("nan")
    bar = tqdm(
        range(start_step, config.num_train_steps),
        initial=start_step,
        total=config.num_train_steps,
        desc=config.optimizer,
        dynamic_ncols=True,
    )
    for step in bar:
        batch = dataset.train_batch(config, step)
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)
        loss = float(metrics["loss"])  # Blocks until the step is done.
        dt = time.perf_counter() - t0
        if step == start_step:
            compile_s = dt
        else:
            step_times.append(dt)
        if not np.isfinite(loss):
            raise FloatingPointError(f"Loss is {loss} at step {step}")
        interval_losses.append(loss)
        done = step + 1
        tokens_per_s = config.tokens_per_step / dt
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

        if done % config.log_every == 0 or done == config.num_train_steps:
            train_loss = float(np.mean(interval_losses))
            interval_losses = []
            writer.write(
                {
                    "step": done,
                    "split": "train",
                    "loss": train_loss,
                    "lr": float(metrics["lr"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tokens_per_s,
                }
            )
        if done % config.eval_every == 0 or done == config.num_train_steps:
            val = evaluate(eval_step, state, dataset, config, full=done == config.num_train_steps)
            writer.write({"step": done, "split": "val", **val})
            bar.write(f"step {done}: val loss {val['loss']:.4f}, ppl {val['perplexity']:.2f}")
        if manager is not None and (
            done % config.checkpoint_every == 0 or done == config.num_train_steps
        ):
            manager.save(done, args=ocp.args.StandardSave(state))
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()

    if not val:  # Nothing left to train (resumed at the end): evaluate once.
        val = evaluate(eval_step, state, dataset, config, full=True)
        train_rows = writer.rows("train")
        train_loss = train_rows[-1]["loss"] if train_rows else float("nan")
    mean_step_s = float(np.mean(step_times)) if step_times else float("nan")
    result = {
        "optimizer": config.optimizer,
        "rank": config.rank if config.optimizer in LOW_RANK_OPTIMIZERS else None,
        "peak_lr": config.peak_lr,
        "seed": config.seed,
        "step": config.num_train_steps,
        "final_train_loss": train_loss,
        "final_val_loss": val["loss"],  # The whole validation split.
        "final_val_perplexity": val["perplexity"],
        "final_val_tokens": val["tokens"],
        "num_params": num_params,
        "opt_state_bytes": opt_state_bytes,
        "mean_step_ms": 1e3 * mean_step_s,
        "tokens_per_s": config.tokens_per_step / mean_step_s if step_times else float("nan"),
        "first_step_s": compile_s,
        "total_time_s": time.perf_counter() - t_start,
    }
    (workdir / "final_metrics.json").write_text(json.dumps(result, indent=2))
    return result
