"""Fira's norm-based scaling of the residual (the part of G outside the subspace)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from fira_optax._node import check_residual_order, map_nodes
from fira_optax._shapes import rank_axis

#: Added to ‖R‖ in φ = ‖N‖ / (‖R‖ + NORM_EPS), as in the official code.
NORM_EPS = 1e-8


def residual_scale(direction: jnp.ndarray, low_rank: jnp.ndarray, side: str) -> jnp.ndarray:
    """`φ = ‖N‖ / (‖R‖ + 1e-8)` reduced over the rank (k) axis, shaped to broadcast on `G`.

    Left side: `R` is `k×n`, φ is `1×n` (one factor per column of G); right side: `R` is `m×k`,
    φ is `m×1` (one per row). This is the official "R's smaller dimension" rule on every shape
    except a left projection with `k == n`, where the official code reduces the other axis
    (and crashes unless the matrix is square); see the README's "Differences".

    `jnp.linalg.norm` does not overflow before its result does: a gradient spike large enough
    to make ‖R‖ infinite gives φ = 0 (the residual of that step is dropped), never NaN.
    """
    axis = rank_axis(side)
    norm_n = jnp.linalg.norm(direction, axis=axis, keepdims=True)
    norm_r = jnp.linalg.norm(low_rank, axis=axis, keepdims=True)
    return norm_n / (norm_r + NORM_EPS)


def norm_scale_residual(scaled: bool = True) -> optax.GradientTransformation:
    """Keeps the residual `S = φ ⊙ (G − α·back(R))`, scaled like the low-rank direction.

    Must follow the subspace optimizer (φ compares its direction `N` with the low-rank
    gradient `R`), once, before the limiter: elsewhere it raises at trace time, naming the
    order. The residual is stored implicitly as φ in the
    :class:`fira_optax.LowRankUpdate` node and materialized by `project_back`. Dense leaves
    pass through. See :func:`fira_optax.fira` for the maths.

    Args:
      scaled: False gives the paper's "without scaling factor" ablation: φ = 1, the residual
        `G − α·back(R)` is added as it is (the limiter, if any, still applies).

    Returns:
      A stateless `optax.GradientTransformation`.
    """

    def phi(u):
        check_residual_order("norm_scale_residual", u)
        scale = residual_scale(u.direction, u.low_rank, u.side)
        return scale if scaled else jnp.ones_like(scale)

    def update_fn(updates, state, params=None):
        del params
        return map_nodes(lambda u: u.replace(residual_scale=phi(u)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
