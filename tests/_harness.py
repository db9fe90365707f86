"""The parity harness: running fira_optax on a gradient sequence (`run_ours`), the per-step
learning rates, the error metric. The gradient sequences are `fira_optax._testing`'s
(`make_problem`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np


def learning_rates(learning_rate: float | Callable, steps: int) -> list[float]:
    """Per-step learning rates; an optax schedule is evaluated at count = 0, 1, ... ."""
    if callable(learning_rate):
        return [float(learning_rate(t)) for t in range(steps)]
    return [float(learning_rate)] * steps


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_ours(
    kind: str,
    w0: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    learning_rate: float | Callable,
    *,
    rank: int,
    update_proj_gap: int,
    scale: float = 1.0,
    proj_type: str = "std",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    gamma: float | None = 1.01,
    projected=(),
    return_states: bool = False,
    **options,
):
    """Run fira_optax (float32, one jit per call); return weights after each step.

    ``kind`` is "fira", "galore", "apollo" or "apollo_mini" (``rank`` must then be 1);
    ``options`` go to ``fo.apollo`` / ``fo.apollo_mini`` (e.g. ``scale_type``,
    ``scale_front``, ``refresh``; ``gamma=None`` turns their limiter off).
    """
    import jax
    import jax.numpy as jnp
    import optax

    import fira_optax as fo

    projected = set(projected)
    mask = {name: name in projected for name in w0}
    kwargs = dict(
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        b1=betas[0],
        b2=betas[1],
        eps=eps,
        weight_decay=weight_decay,
        projected=mask,
    )
    if kind == "fira":
        tx = fo.fira(learning_rate, rank, gamma=gamma, **kwargs)
    elif kind == "galore":
        tx = fo.galore(learning_rate, rank, **kwargs)
    elif kind == "apollo":
        tx = fo.apollo(learning_rate, rank, gamma=gamma, **kwargs, **options)
    elif kind == "apollo_mini" and rank == 1:
        tx = fo.apollo_mini(learning_rate, gamma=gamma, **kwargs, **options)
    else:
        raise ValueError(f"kind {kind!r} (rank {rank})")
    if options and not kind.startswith("apollo"):
        raise ValueError(f"options {sorted(options)} are for fo.apollo / fo.apollo_mini")

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    # XLA's CPU compile of one update (~3 s, the bulk of a case) halves at optimisation level 0;
    # the arithmetic is the same float32 arithmetic. FIRA_PARITY_XLA_OPT=1 keeps the defaults.
    if os.environ.get("FIRA_PARITY_XLA_OPT") == "1":
        step = jax.jit(step)
    else:
        step = jax.jit(step, compiler_options=_FAST_COMPILE)

    params = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in w0.items()}
    state = tx.init(params)
    history, states = [], []
    for g in grads:
        params, state = step(params, state, {k: jnp.asarray(v) for k, v in g.items()})
        history.append({k: np.asarray(v) for k, v in params.items()})
        if return_states:
            states.append(state)
    return (history, states) if return_states else history


def relative_errors(
    ours: Sequence[Mapping[str, np.ndarray]],
    ref: Sequence[Mapping[str, np.ndarray]],
    w0: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Per leaf: max over steps and entries |ours - ref| / max |ref_final - w0|."""
    out = {}
    for name in w0:
        w0_ = np.asarray(w0[name], dtype=np.float64)
        disp = np.abs(np.asarray(ref[-1][name], dtype=np.float64) - w0_).max()
        err = max(
            np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64)).max()
            for a, b in zip(ours, ref, strict=True)
        )
        out[name] = float(err / disp)
    return out
