"""Training loop for the LLaMA pre-training example (AdamW, GaLore or Fira).

``train_and_evaluate(config, workdir)`` builds the model and optimizer, trains for
``config.num_train_steps`` optimizer updates and returns the final metrics. Along the way
it writes

* ``workdir/metrics.jsonl``: one JSON object per line, ``{"split": "train", ...}`` every
  ``log_every`` steps (mean loss of the interval, lr, grad norm, tokens/s, ms per step) and
  ``{"split": "val", ...}`` every ``eval_every`` steps (loss, perplexity),
* ``workdir/events.out.tfevents.*``: the same numbers as TensorBoard scalars
  (``train/loss``, ``train/lr``, ``train/step_ms``, ``val/loss``, ...; written with
  ``tensorboardX``, no TensorFlow needed) and the config as text; ``tensorboard --logdir
  runs`` shows every run under ``runs``,
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
jitted steps are cached per (graph, config, mesh), so a second run of the same config in
one process (a resume, the tests) does not recompile.

Mesh (``mesh=``, ``main.py --mesh fsdp=4,tensor=2``; see ``sharding.py``): the state is
created sharded (params by the per-kernel rule of ``sharding.param_partition_spec``, the
optimizer state by ``fira_optax.optimizer_state_shardings``, counters replicated), the
steps are jitted with explicit in/out shardings, every process puts only its rows of each
global batch on its devices (``jax.make_array_from_process_local_data``), and checkpoints
are written and read sharded (each process its shards). The default mesh puts every device
on ``data``: on one device, the single-device run. With several processes
(``jax.distributed``), only process 0 writes the metrics files and prints.
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
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from examples.llama_pretrain import configs, input_pipeline, sharding
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
def make_optimizer(config: Config, mesh: Mesh | None = None) -> optax.GradientTransformation:
    """The optimizer named ``config.optimizer`` (see ``configs.OPTIMIZERS``), one schedule.

    * ``adamw``: ``optax.adamw`` at ``adamw_learning_rate``.
    * ``galore`` / ``fira``: ``fo.galore`` / ``fo.fira`` at ``learning_rate``.
    * ``fira_no_limiter`` / ``fira_no_phi``: the paper's ablations, as ``fira_optax`` block
      chains: Fira without ``limit_norm_growth``, and Fira with the residual added unscaled
      (``norm_scale_residual(scaled=False)``: phi = 1, limiter kept).
    * ``adamw_control``: ``optax.adamw`` with the projected matrices (``fo.projected_mask``)
      at ``adamw_learning_rate`` and the other leaves (embeddings, head, norms) at
      ``learning_rate``, as the low-rank optimizers train them.

    The low-rank optimizers refresh on ``config.refresh_schedule``. On a ``mesh`` of several
    devices with ``config.divide_refresh``, they get the params' layout
    (``refresh_shardings=``): a refresh step sends each device the gradient blocks of its
    share of the projected matrices (one all-to-all), each device decomposes only those, and
    the bases come back at rank size; no device gathers every gradient or computes every SVD.

    Cached per (config, mesh): runs of one config in one process share the transformation,
    hence an equal ``nnx`` graph definition and the compiled steps of ``compiled_steps``.
    """
    schedule = make_schedule(config)
    common = dict(b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        tx = optax.adamw(schedule, **common)
    elif config.optimizer == "adamw_control":
        import fira_optax as fo

        rest = make_schedule(dataclasses.replace(config, optimizer="fira"))  # learning_rate

        def labels(params):  # the matrices the default rule projects (at any rank)
            mask = fo.projected_mask(params, fo.ProjectionSpec(rank=None))
            return jax.tree.map(lambda p: "matrices" if p else "rest", mask)

        tx = optax.multi_transform(
            {"matrices": optax.adamw(schedule, **common), "rest": optax.adamw(rest, **common)},
            labels,
        )
    elif config.optimizer in LOW_RANK_OPTIMIZERS:
        import fira_optax as fo

        refresh = dict(refresh_schedule=config.refresh_schedule)
        if mesh is not None and mesh.size > 1 and config.divide_refresh:
            refresh["refresh_shardings"] = _abstract_param_shardings(config, mesh)
        low_rank = dict(
            update_proj_gap=config.update_proj_gap,
            scale=config.scale,
            proj_type=config.proj_type,
            **refresh,
            **common,
        )
        family = dict(low_rank, scale=config.apollo_scale)
        if config.optimizer == "fira":
            tx = fo.fira(schedule, config.rank, gamma=config.gamma, **low_rank)
        elif config.optimizer == "galore":
            tx = fo.galore(schedule, config.rank, **low_rank)
        elif config.optimizer == "apollo":
            tx = fo.apollo(schedule, config.rank, gamma=config.gamma, **family)
        elif config.optimizer == "apollo_mini":
            del family["scale"]  # APOLLO-Mini: rank 1, its own scale
            tx = fo.apollo_mini(schedule, gamma=config.gamma, **family)
        elif config.optimizer == "golore":
            low_rank.pop("refresh_shardings", None)  # refreshes where the gradient is
            svd_steps = int(config.golore_svd_frac * config.num_train_steps)
            tx = fo.golore(schedule, config.rank, svd_steps=svd_steps, **low_rank)
        elif config.optimizer == "frugal":
            del low_rank["scale"]  # no α: the subspace update is projected back as it is
            tx = fo.frugal(
                schedule,
                config.rank,
                state_free=config.frugal_state_free,
                state_free_learning_rate_ratio=config.frugal_state_free_ratio,
                **low_rank,
            )
        else:
            spec = fo.ProjectionSpec(config.rank, config.proj_type)
            residual = {
                "fira_no_limiter": [fo.norm_scale_residual()],
                "fira_no_phi": [
                    fo.norm_scale_residual(scaled=False),
                    fo.limit_norm_growth(spec, gamma=config.gamma),
                ],
            }[config.optimizer]
            tx = optax.chain(
                fo.project(
                    spec,
                    update_proj_gap=config.update_proj_gap,
                    scale=config.scale,
                    **refresh,
                ),
                fo.scale_by_low_rank_adam(spec, b1=config.b1, b2=config.b2, eps=config.eps),
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


def make_train_step(
    graphdef: nnx.GraphDef,
    schedule: optax.Schedule,
    shardings: nnx.State | None = None,
    mesh: Mesh | None = None,
):
    """Returns ``train_step(state, tokens_AxBxL1) -> (state, metrics)``, jitted.

    With the state's ``shardings`` (``state_shardings``) on ``mesh``, the step is compiled
    with explicit shardings: the state in and out as given (donated), the batch split over
    ``("data", "fsdp")`` along its batch axis, the metrics replicated. Inside, the weights
    are gathered over ``fsdp`` for the forward and backward passes
    (``sharding.gather_for_compute``) and the gradients reduce-scattered back to their
    params' sharding, where the optimizer update runs. Without ``shardings``, a plain
    ``jax.jit`` (the inputs' shardings decide).
    """

    def constrain(tree):  # Gradients sharded like their params (reduce-scatter over fsdp).
        if mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, sharding.param_shardings(tree, mesh))

    def gather(params):  # FSDP: each weight gathered over "fsdp" for the forward/backward.
        return params if mesh is None else sharding.gather_for_compute(params, mesh)

    def train_step(state: nnx.State, tokens_AxBxL1: jax.Array):
        model, optimizer = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def micro_loss(params, tokens_BxL1):
            return loss_fn(nnx.merge(model_def, gather(params), rest), tokens_BxL1)

        def accumulate(carry, tokens_BxL1):
            loss_sum, grad_sum = carry
            loss, grads = jax.value_and_grad(micro_loss)(params, tokens_BxL1)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, constrain(grads))), None

        zeros = constrain(jax.tree.map(jnp.zeros_like, params))
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

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(
        train_step,
        in_shardings=(shardings, sharding.batch_sharding(mesh, 3, batch_axis=1)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(
    graphdef: nnx.GraphDef, shardings: nnx.State | None = None, mesh: Mesh | None = None
):
    """Returns ``eval_step(state, tokens_BxL1) -> loss``, jitted (explicit shardings on a mesh:
    the batch's sharding is the caller's, see ``compiled_steps``)."""

    def eval_step(state: nnx.State, tokens_BxL1: jax.Array) -> jax.Array:
        model, _ = nnx.merge(graphdef, state)
        if mesh is not None:  # FSDP: weights gathered over "fsdp" (see make_train_step).
            model_def, params, rest = nnx.split(model, nnx.Param, ...)
            model = nnx.merge(model_def, sharding.gather_for_compute(params, mesh), rest)
        return loss_fn(model, tokens_BxL1)

    if shardings is None:
        return jax.jit(eval_step)
    return jax.jit(
        eval_step, in_shardings=(shardings, None), out_shardings=sharding.replicated(mesh)
    )


@functools.lru_cache(maxsize=16)
def _abstract_param_shardings(config: Config, mesh: Mesh) -> Any:
    """The ``NamedSharding`` tree of the model's params on ``mesh`` (nothing allocated)."""
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(config.seed)))
    return sharding.param_shardings(nnx.as_pure(nnx.state(model, nnx.Param)), mesh)


def _build(config: Config, mesh: Mesh | None = None) -> tuple[Llama, nnx.Optimizer]:
    model = Llama(config, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, make_optimizer(config, mesh), wrt=nnx.Param)


def abstract_train_state(config: Config, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of ``(model, nnx.Optimizer)`` without allocating anything.

    The state's leaves are ``jax.ShapeDtypeStruct``s carrying their ``NamedSharding`` on
    ``mesh``: the params by ``sharding.param_partition_spec``, the optimizer state by
    ``fira_optax.optimizer_state_shardings`` (low-rank moments and bases follow their
    params), the step counter and any other leaf replicated.
    """
    model, optimizer = nnx.eval_shape(lambda: _build(config, mesh))
    graphdef, abstract = nnx.split((model, optimizer))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    param_sh = _abstract_param_shardings(config, mesh)
    by_path = {
        (0, *sharding.path_tuple(p)): s
        for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]
    }
    opt_sh = sharding.opt_state_shardings(make_optimizer(config, mesh), params, param_sh)
    by_path.update({(1, "opt_state", *path): s for path, s in opt_sh.items()})

    def one(path, x):
        keys = sharding.path_tuple(path)
        if keys[:2] == (1, "opt_state") and keys not in by_path:
            raise KeyError(f"No sharding for optimizer state leaf {keys} (state layout changed?)")
        s = by_path.get(keys, sharding.replicated(mesh))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return graphdef, jax.tree_util.tree_map_with_path(one, abstract)


def state_shardings(abstract: nnx.State) -> nnx.State:
    """The ``NamedSharding`` tree of an ``abstract_train_state``."""
    return jax.tree.map(lambda x: x.sharding, abstract)


@functools.lru_cache(maxsize=16)
def _init_fn(config: Config, mesh: Mesh):
    """The initializer of the state in its sharded layout.

    On a mesh of several devices, one jitted function that creates every shard where it
    lives (no device ever holds the whole state). On one device, eager initialization
    committed to the device: the one-device runs of `results/` start from exactly these
    weights (the fused, jitted initializer rounds the normal samples differently, by up to
    1 ulp, so it would not reproduce them bit for bit).
    """
    shardings = state_shardings(abstract_train_state(config, mesh)[1])
    if mesh.size == 1:
        return lambda: jax.device_put(nnx.state(_build(config, mesh)), shardings)
    return jax.jit(lambda: nnx.state(_build(config, mesh)), out_shardings=shardings)


def create_train_state(
    config: Config, mesh: Mesh | str | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """Initial ``(graphdef, state)`` of ``(model, nnx.Optimizer)``, created in its sharded
    layout on the mesh (default: all devices on ``data``; see ``_init_fn``)."""
    mesh = sharding.make_mesh(mesh)
    graphdef, _ = abstract_train_state(config, mesh)
    return graphdef, _init_fn(config, mesh)()


def compiled_steps(graphdef: nnx.GraphDef, config: Config, mesh: Mesh | str | None = None):
    """(train_step, eval_step) for a graph, config and mesh, reused by later runs in-process.

    Both take the batch as the host's numpy array of the *global* batch (or a global
    ``jax.Array``): every process keeps only the rows its devices hold
    (``sharding.host_to_global``). Training batches are split over ``("data", "fsdp")``;
    an evaluation batch too when its size divides, else (the last, short batch of the full
    validation pass) it is replicated.
    """
    return _compiled_steps(graphdef, config, sharding.make_mesh(mesh))


@functools.lru_cache(maxsize=16)
def _compiled_steps(graphdef: nnx.GraphDef, config: Config, mesh: Mesh):
    shardings = state_shardings(abstract_train_state(config, mesh)[1])
    train_jit = make_train_step(graphdef, make_schedule(config), shardings, mesh)
    eval_jit = make_eval_step(graphdef, shardings, mesh)
    train_batch_sh = sharding.batch_sharding(mesh, 3, batch_axis=1)
    num_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % num_batch_shards:
        raise ValueError(
            f"batch_size={config.batch_size} (the global micro-batch) must be divisible by "
            f"data x fsdp = {num_batch_shards} of the mesh {dict(mesh.shape)}."
        )

    def train_step(state, tokens_AxBxL1):
        return train_jit(state, sharding.host_to_global(tokens_AxBxL1, train_batch_sh, 1))

    def eval_step(state, tokens_BxL1):
        if tokens_BxL1.shape[0] % num_batch_shards == 0:
            batch_sh = sharding.batch_sharding(mesh, 2, batch_axis=0)
        else:
            batch_sh = sharding.replicated(mesh)
        return eval_jit(state, sharding.host_to_global(tokens_BxL1, batch_sh, 0))

    return train_step, eval_step


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
    """Appends JSON lines to ``workdir/metrics.jsonl`` (dropping rows past a resume point)
    and writes each row's numbers as TensorBoard scalars ``<split>/<key>`` next to it.

    ``enabled=False`` (processes other than 0 of a multi-process run): reads, never writes.
    On a resume, the TensorBoard writer purges the points at and after ``resume_step``
    (``purge_step``), so TensorBoard shows the resumed run's, as the JSONL does.
    """

    def __init__(self, path: pathlib.Path, resume_step: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.summaries = None
        if enabled and path.exists():
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in keep))
        if enabled:
            from tensorboardX import SummaryWriter

            purge = resume_step + 1 if resume_step else None  # Rows <= resume_step stay.
            self.summaries = SummaryWriter(str(path.parent), purge_step=purge, flush_secs=30)

    def write_config(self, config: Config) -> None:
        """The config as a TensorBoard text summary (the Text tab)."""
        if self.summaries is not None:
            text = json.dumps(dataclasses.asdict(config), indent=2)
            self.summaries.add_text("config", f"```\n{text}\n```", global_step=0)

    def rows(self, split: str) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["split"] == split]

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self.summaries.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def flush(self) -> None:
        if self.summaries is not None:
            self.summaries.flush()

    def close(self) -> None:
        if self.summaries is not None:
            self.summaries.close()


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


def train_and_evaluate(
    config: Config | ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    mesh: Mesh | str | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns metrics.

    ``config``: a ``Config`` or a ``ConfigDict`` with its fields (``configs.get_config``),
    validated by ``configs.from_config_dict``.

    ``mesh``: a ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "tensor")`` or a spec
    such as ``"fsdp=4,tensor=2"`` (``sharding.parse_mesh``); default: every device on
    ``data``. In a multi-process run every process calls this with the same arguments and
    ``workdir`` on a file system they share.
    """
    t_start = time.perf_counter()
    if not isinstance(config, Config):
        config = configs.from_config_dict(config)
    mesh = sharding.make_mesh(mesh)
    is_main = jax.process_index() == 0
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    dataset = input_pipeline.load_dataset(config)
    if dataset.vocab_size != config.vocab_size:
        config = dataclasses.replace(config, vocab_size=dataset.vocab_size)
    if is_main:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    graphdef, abstract = abstract_train_state(config, mesh)
    model, optimizer = nnx.merge(graphdef, abstract)  # Shapes, for reporting only.
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    opt_state_bytes = tree_nbytes(optimizer.opt_state)
    del model, optimizer
    log = print if is_main else (lambda *a, **k: None)
    log(
        f"{config.optimizer}: {num_params / 1e6:.2f}M params, "
        f"{len(dataset.train_tokens) / 1e6:.2f}M train / {len(dataset.val_tokens) / 1e6:.2f}M "
        f"val tokens from {dataset.num_documents} documents; {sharding.describe_mesh(mesh)}"
    )
    if config.optimizer in ("galore", "fira"):
        import fira_optax as fo

        log(fo.describe_projection(params, fo.ProjectionSpec(config.rank, config.proj_type)))

    train_step, eval_step = compiled_steps(graphdef, config, mesh)  # Checks the batch size.
    manager = _checkpoint_manager(workdir, config)
    start_step = 0
    if manager is not None and manager.latest_step() is not None:
        start_step = manager.latest_step()
        # Restored straight into the sharded layout: each process reads only its shards.
        state = manager.restore(start_step, args=ocp.args.StandardRestore(abstract))
        log(f"Resumed from {workdir / 'checkpoints'} at step {start_step}")
    else:
        state = _init_fn(config, mesh)()

    writer = MetricsWriter(workdir / "metrics.jsonl", start_step, enabled=is_main)
    writer.write_config(config)

    step_times: list[float] = []
    interval_times: list[float] = []  # Step times since the last train row, compile excluded.
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
        disable=not is_main,
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
            interval_times.append(dt)
        if not np.isfinite(loss):
            raise FloatingPointError(f"Loss is {loss} at step {step}")
        interval_losses.append(loss)
        done = step + 1
        tokens_per_s = config.tokens_per_step / dt
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

        if done % config.log_every == 0 or done == config.num_train_steps:
            train_loss = float(np.mean(interval_losses))
            step_ms = 1e3 * float(np.mean(interval_times)) if interval_times else 1e3 * dt
            interval_losses, interval_times = [], []
            writer.write(
                {
                    "step": done,
                    "split": "train",
                    "loss": train_loss,
                    "lr": float(metrics["lr"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tokens_per_s,
                    "step_ms": step_ms,  # Mean of the interval (the compile step left out).
                }
            )
        if done % config.eval_every == 0 or done == config.num_train_steps:
            val = evaluate(eval_step, state, dataset, config, full=done == config.num_train_steps)
            writer.write({"step": done, "split": "val", **val})
            writer.flush()
            if is_main:
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
    writer.close()
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
    if is_main:
        (workdir / "final_metrics.json").write_text(json.dumps(result, indent=2))
    return result
