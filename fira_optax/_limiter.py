"""Fira's norm-growth limiter on the scaled residual."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_optax import _masks
from fira_optax._projection import back_matrix, check_hyperparams, is_low_rank, rank_axis

#: Added to the remembered norm in the growth ratio, as in the official code.
LIMITER_EPS = 1e-8

#: Below this fraction of `Σ φ²‖G_i‖²` the fast residual norm falls back to the exact one.
#: At the threshold the fast norm's float32 round-off is ≲ 1e-4 of ‖S‖² (≲ 5e-5 of ‖S‖).
CANCELLATION = 1e-2


class LimitNormGrowthState(NamedTuple):
    """State of :func:`limit_norm_growth`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32`; at 0 the norm is only
        remembered (the official first-step rule).
      norms: a tree like params: for a projected leaf, the remembered residual norm `g`
        (float32, one per matrix: shape `(...)` of the leaf's batch axes); None elsewhere.
    """

    count: jax.Array
    norms: Any


def residual_norm(u: Any) -> jax.Array:
    """`‖S‖_F` of the implicit residual `S = φ ⊙ (G − α·back(R))`, per matrix.

    Fast path, without building `S`: along the axis φ is shared over (rows for the right side,
    columns for the left side), with `G_i = back(R_i) + E_i` and `E_i ⊥` the subspace,
    `‖G_i − α·back(R_i)‖² = (‖G_i‖² − ‖R_i‖²) + (1 − α)²‖R_i‖²` (exact for an orthonormal
    basis): one reduction over G instead of a third m×n×k matmul.

    The first term cancels when G lies (almost) inside the subspace — e.g. on a refresh step
    when the rank keeps a whole side of the matrix — and its float32 round-off (~1e-7·‖G_i‖²)
    would then dominate. When the fast `‖S‖²` is below `CANCELLATION` × `Σ φ²‖G_i‖²` for any
    matrix of the leaf, the exact norm of the explicit `S` is computed instead (under
    `lax.cond`, so the extra matmul runs only on such steps).
    """
    axis = rank_axis(u.side)
    grad = u.grad.astype(jnp.float32)
    phi_sq = jnp.square(u.residual_scale)
    g_sq = jnp.sum(jnp.square(grad), axis=axis, keepdims=True)
    r_sq = jnp.sum(jnp.square(u.low_rank), axis=axis, keepdims=True)
    outside = jnp.maximum(g_sq - r_sq, 0.0)
    inside = jnp.square(1.0 - u.scale) * r_sq
    fast_sq = jnp.sum(phi_sq * (outside + inside), axis=(-2, -1))
    scale_sq = jnp.sum(phi_sq * g_sq, axis=(-2, -1))

    def exact():
        back = u.scale * back_matrix(u.low_rank, u.basis, u.side)
        residual = u.residual_scale * (grad - back)
        return jnp.sqrt(jnp.sum(jnp.square(residual), axis=(-2, -1)))

    cancels = jnp.any(fast_sq < CANCELLATION * scale_sq)
    return jax.lax.cond(cancels, exact, lambda: jnp.sqrt(fast_sq))


def limit_norm_growth(
    gamma: jax.typing.ArrayLike = 1.01, *, projected: _masks.ProjectedSpec = None
) -> optax.GradientTransformation:
    """Lets the residual's norm grow at most `gamma`× per step (Fira's spike guard).

    First step: remember `g = ‖S‖_F`, no limiting. Later steps:
    `λ = max(‖S‖ / (g + 1e-8), γ) / γ`, `S ← S / λ`, `g ← ‖S‖ / λ` (the norm after limiting).
    Must follow :func:`fira_optax.norm_scale_residual`. Each matrix (also each matrix of a
    stacked leaf) has its own memory `g`; the memory is carried across basis refreshes.

    Args:
      gamma: γ ≥ 1, the allowed growth factor per step.
      projected: the `projected` given to `project` (it sets which leaves get a memory).

    Returns:
      An `optax.GradientTransformation`.
    """
    check_hyperparams(gamma=gamma)

    def init_fn(params):
        mask = _masks.projected_mask(params, projected)
        norms = jax.tree.map(
            lambda p, is_proj: jnp.zeros(p.shape[:-2], jnp.float32) if is_proj else None,
            params,
            mask,
        )
        return LimitNormGrowthState(count=jnp.zeros([], jnp.int32), norms=norms)

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0
        flat_u, treedef = jax.tree.flatten_with_path(updates, is_leaf=is_low_rank)
        flat_norms = treedef.flatten_up_to(state.norms)
        new_updates, new_norms = [], []
        for (path, u), memory in zip(flat_u, flat_norms, strict=True):
            if not is_low_rank(u):
                new_updates.append(u)
                new_norms.append(memory)
                continue
            if u.residual_scale is None:
                raise ValueError(
                    f"limit_norm_growth: leaf {_masks.path_str(path)!r} has no residual; put "
                    "norm_scale_residual() before limit_norm_growth() in the chain."
                )
            if memory is None or memory.shape != u.grad.shape[:-2]:
                raise ValueError(
                    f"limit_norm_growth: leaf {_masks.path_str(path)!r} is projected but the state "
                    "has no norm memory for it. Give limit_norm_growth the same `projected` as "
                    "project()."
                )
            norm = residual_norm(u)
            ratio = jnp.maximum(norm / (memory + LIMITER_EPS), gamma) / gamma
            limiter = jnp.where(first, 1.0, ratio)
            new_norms.append(norm / limiter)
            new_updates.append(
                u.replace(residual_scale=u.residual_scale / limiter[..., None, None])
            )
        return treedef.unflatten(new_updates), LimitNormGrowthState(
            count=optax.safe_increment(state.count), norms=treedef.unflatten(new_norms)
        )

    return optax.GradientTransformation(init_fn, update_fn)
