"""`project_back`: turns the low-rank nodes into dense updates (one matmul, one fused pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fira_optax._node import LowRankUpdate, map_nodes
from fira_optax._shapes import back_matrix, per_matrix


def dense_update(u: LowRankUpdate) -> jax.Array:
    """`c · (α·back(N) + S)` as a dense array of the leaf's shape and dtype (`c` the node's
    `bias_correction`, `back(X)` the plain back-projection `P X` or `X P`).

    With the implicit residual `S = φ ⊙ (G − α·back(R))` and φ constant along the rank axis,
    `φ ⊙ back(R) = back(φ ⊙ R)`, so `α·back(N) + S = α·back(N − φ ⊙ R) + φ ⊙ G`: one
    `m×k×n` matmul plus one elementwise pass over G, and no m×n temporary for `back(R)`.
    After :func:`fira_optax.norm_scale_gradient` (α = 0) it is `c · φ ⊙ G`: no
    matmul. A sign residual (:func:`fira_optax.state_free_residual`, `S = φ ⊙ sign(G −
    α·back(R))`) takes two matmuls, `back(N)` and `back(R)`, and an m×n temporary.
    """
    if not u.back_projected:
        dense = (u.bias_correction * u.phi) * u.grad.astype(jnp.float32)
    elif u.phi is None:
        dense = back_matrix(u.alpha * u.bias_correction * u.direction, u.basis, u.side)
    elif u.residual_sign:
        # S = φ ⊙ sign(G − α·back(R)) (state_free_residual, "sign") is not linear in G:
        # back(R) is built explicitly, one more matmul. A square basis spans the whole
        # projected side: G − α·back(R) is round-off there, and the state-free step is zero.
        dense = back_matrix(u.alpha * u.bias_correction * u.direction, u.basis, u.side)
        if u.basis.shape[-1] != u.basis.shape[-2]:
            outside = u.grad.astype(jnp.float32) - u.alpha * back_matrix(
                u.low_rank, u.basis, u.side
            )
            dense = dense + (u.bias_correction * u.phi) * jnp.sign(outside)
    else:
        phi = u.phi
        low_rank = u.alpha * u.bias_correction * (u.direction - phi * u.low_rank)
        dense = back_matrix(low_rank, u.basis, u.side) + (u.bias_correction * phi) * u.grad.astype(
            jnp.float32
        )
    # An idle matrix (G exactly zero) does not move, whatever the subspace optimizer's
    # direction (a momentum-type base optimizer would keep moving it).
    dense = jnp.where(per_matrix(u.active), dense, 0.0)
    return u.plan.view.from_matrix(dense.astype(u.grad.dtype))


def project_back() -> optax.GradientTransformation:
    """Ends the projected part of a chain: every :class:`LowRankUpdate` becomes a dense update.

    The output for a projected leaf is `c_t·(α·back(N) + S)` (GaLore: `c_t·α·back(N)`;
    APOLLO, after :func:`fira_optax.norm_scale_gradient`: `c_t·φ ⊙ G`), and
    exactly zero for an idle matrix (its gradient is exactly zero), `c_t`
    the node's `bias_correction` (set by
    :func:`fira_optax.scale_by_low_rank_adam`, times any scalar a transform in between
    multiplied the node by), in the leaf's shape; dense leaves pass through. See
    :func:`fira_optax.fira` for the maths.

    Returns:
      A stateless `optax.GradientTransformation`.
    """

    def update_fn(updates, state, params=None):
        del params
        return map_nodes(dense_update, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
