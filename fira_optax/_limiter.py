"""Fira's norm-growth limiter on the scaled residual."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_optax._checks import check_real
from fira_optax._node import is_low_rank
from fira_optax._shapes import back_matrix, per_matrix, rank_axis
from fira_optax._spec import ProjectionSpec, check_spec

#: Added to the remembered norm in the growth ratio, as in the official code.
LIMITER_EPS = 1e-8

#: Below this fraction of `Σ φ²‖G_i‖²` the fast residual norm falls back to the exact one.
#: At the threshold the fast norm's float32 round-off is ≲ 1e-4 of ‖S‖² (≲ 5e-5 of ‖S‖).
CANCELLATION = 1e-2


class LimitNormGrowthState(NamedTuple):
    """State of :func:`limit_norm_growth`.

    Attributes:
      norms: a tree like params: for a projected leaf, the remembered residual norm `g`
        (float32, one per matrix: shape `(...)` of the leaf's stack axes; 0 until the matrix's
        first step with a non-zero gradient); None elsewhere.
    """

    norms: Any


def _safe_norm(x: jax.Array) -> jax.Array:
    """`‖x‖_F` per matrix over the last two axes, without overflow for any finite `x`."""
    amax = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    unit = jnp.where(amax > 0, amax, 1.0)
    return jnp.sqrt(jnp.sum(jnp.square(x / unit), axis=(-2, -1))) * amax[..., 0, 0]


def residual_norm(u: Any) -> jax.Array:
    """`‖S‖_F` of the implicit residual `S = φ ⊙ (G − α·back(R))`, per matrix.

    Fast path, without building `S`: along the axis φ is shared over (rows for the right side,
    columns for the left side), with `G_i = back(R_i) + E_i` and `E_i ⊥` the subspace,
    `‖G_i − α·back(R_i)‖² = (‖G_i‖² − ‖R_i‖²) + (1 − α)²‖R_i‖²` (exact for an orthonormal
    basis): one reduction over G instead of a third m×n×k matmul.

    The exact norm of the explicit `S` (scaled before squaring, so it cannot overflow for any
    finite input) is computed instead always when the basis is not orthonormal (the "random"
    refresh, a user's callable), else under `lax.cond` so the extra matmul runs only on such
    steps, when for any matrix of the leaf

    - the first term cancels: the fast `‖S‖²` is below `CANCELLATION` × `Σ φ²‖G_i‖²` (G lies
      almost inside the subspace, e.g. on a refresh step when the rank keeps a whole side of
      the matrix; its float32 round-off, ~1e-7·‖G_i‖², would dominate), or
    - a square overflowed: a huge but finite gradient (`‖G_i‖² > 3.4e38`) would give
      `inf − inf`.

    After :func:`fira_optax.norm_scale_gradient` (α = 0, any basis) `S = φ ⊙ G` and
    `‖S‖² = Σ φ²‖G_i‖²` exactly: one reduction over G, no basis, nothing to cancel; the
    scaled-before-squaring norm of `φ ⊙ G` only when a square overflowed.
    """
    axis = rank_axis(u.side)
    grad = u.grad.astype(jnp.float32)
    phi_sq = jnp.square(u.phi)
    g_sq = jnp.sum(jnp.square(grad), axis=axis, keepdims=True)
    if not u.back_projected:  # α = 0: S = φ ⊙ G
        plain_sq = jnp.sum(phi_sq * g_sq, axis=(-2, -1))
        return jax.lax.cond(
            jnp.all(jnp.isfinite(plain_sq)),
            lambda: jnp.sqrt(plain_sq),
            lambda: _safe_norm(u.phi * grad),
        )
    r_sq = jnp.sum(jnp.square(u.low_rank), axis=axis, keepdims=True)
    outside = jnp.maximum(g_sq - r_sq, 0.0)
    inside = jnp.square(1.0 - u.alpha) * r_sq
    fast_sq = jnp.sum(phi_sq * (outside + inside), axis=(-2, -1))
    scale_sq = jnp.sum(phi_sq * g_sq, axis=(-2, -1))

    def exact():
        back = u.alpha * back_matrix(u.low_rank, u.basis, u.side)
        return _safe_norm(u.phi * (grad - back))

    if not u.orthonormal:  # the identity above needs an orthonormal basis
        return exact()
    fallback = jnp.any((fast_sq < CANCELLATION * scale_sq) | ~jnp.isfinite(fast_sq + scale_sq))
    return jax.lax.cond(fallback, exact, lambda: jnp.sqrt(fast_sq))


def limit_norm_growth(
    spec: ProjectionSpec | None = None, gamma: jax.typing.ArrayLike = 1.01
) -> optax.GradientTransformation:
    """Lets the residual's norm grow at most `gamma`× per step (Fira's spike guard).

    First step of a matrix: remember `g = ‖S‖_F`, no limiting. Later steps:
    `λ = max(‖S‖ / (g + 1e-8), γ) / γ`, `S ← S / λ`, `g ← ‖S‖ / λ` (the norm after limiting).
    Must follow :func:`fira_optax.norm_scale_residual` (or, for APOLLO,
    :func:`fira_optax.norm_scale_gradient`: then `S = φ ⊙ G`). Each matrix (also each matrix
    of a stacked leaf) has its own memory `g`; the memory is carried across basis refreshes.

    **A matrix's first step** is its own first step with a non-zero gradient (its step
    count, carried by the node, is 1), as PyTorch counts a parameter's first step. An idle
    matrix (an expert that received no tokens, a layer frozen by zeroing its gradient: `G`
    exactly zero) takes no step and leaves its memory untouched, like a parameter whose
    `grad` is None. An active matrix remembers its residual norm even when it is 0 (a
    gradient inside the subspace), as the official code does: a later gradient orthogonal to
    the basis (`R = 0`, so `φ = ‖N‖ / 10^{-8}`) is then held at γ× per step instead of being
    applied at that scale. A non-finite norm leaves the memory untouched. On any input
    without non-finite values this is exactly the official rule.

    The memories' shapes come from the spec: which leaves are projected and their stack
    shapes (its rank is not needed). Without one (None) every leaf the default rule could
    project gets a memory (the default `projected` and `dimension_numbers`, at any rank),
    which serves any chain whose `project` uses those defaults.

    Args:
      spec: the :class:`fira_optax.ProjectionSpec` given to `project`, or None (see above).
      gamma: γ ≥ 1, the allowed growth factor per step.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp, optax, fira_optax as fo
      >>> params = {"layers": {"w": jnp.ones((3, 8, 4))}}  # a stack of 3 matrices
      >>> spec = fo.ProjectionSpec(rank=2)
      >>> tx = optax.chain(
      ...     fo.project(spec),
      ...     fo.scale_by_low_rank_adam(spec),
      ...     fo.norm_scale_residual(),
      ...     fo.limit_norm_growth(spec, gamma=1.01),
      ...     fo.project_back(),
      ... )
      >>> tx.init(params)[3].norms["layers"]["w"].shape  # one memory per matrix
      (3,)
    """
    check_real(
        "gamma",
        gamma,
        low=1.0,
        low_open=False,
        what="a finite number >= 1 (the allowed norm growth per step)",
    )
    spec = check_spec("limit_norm_growth", spec, need_rank=False, allow_none=True)
    if spec is None:
        spec = ProjectionSpec(None)

    def init_fn(params):
        norms = jax.tree.structure(params).unflatten(
            [
                None if plan is None else jnp.zeros(plan.batch_shape, jnp.float32)
                for plan in spec.flat_plans(params)
            ]
        )
        return LimitNormGrowthState(norms=norms)

    def update_fn(updates, state, params=None):
        del params
        flat_u, treedef = jax.tree.flatten(updates, is_leaf=is_low_rank)
        flat_norms = treedef.flatten_up_to(state.norms)
        new_updates, new_norms = [], []
        for u, memory in zip(flat_u, flat_norms, strict=True):
            if not is_low_rank(u):
                new_updates.append(u)
                new_norms.append(memory)
                continue
            if u.phi is None:
                raise ValueError(
                    f"limit_norm_growth: leaf {u.plan.path!r} has no residual; put "
                    "norm_scale_residual() before limit_norm_growth() in the chain "
                    "(norm_scale_gradient() for APOLLO)."
                )
            if u.residual_sign:
                raise ValueError(
                    f"limit_norm_growth: leaf {u.plan.path!r} has a sign residual "
                    "(state_free_residual(rule='sign')), whose norm is fixed by construction "
                    "(the ratio times the square root of its non-zero entries): there is no "
                    "growth to limit. Drop limit_norm_growth() or use rule='sgd'."
                )
            if memory is None or memory.shape != u.plan.batch_shape:
                raise ValueError(
                    f"limit_norm_growth: leaf {u.plan.path!r} is projected but the state has "
                    "no norm memory for it. Give limit_norm_growth the spec given to project() "
                    "(fo.limit_norm_growth(spec))."
                )
            norm = residual_norm(u)
            ratio = jnp.maximum(norm / (memory + LIMITER_EPS), gamma) / gamma
            limiter = jnp.where(u.step == 1, 1.0, ratio)  # a matrix's first step: remember
            remember = u.active & jnp.isfinite(norm)
            new_norms.append(jnp.where(remember, norm / limiter, memory))
            new_updates.append(u.replace(phi=u.phi / per_matrix(limiter)))
        return treedef.unflatten(new_updates), LimitNormGrowthState(
            norms=treedef.unflatten(new_norms)
        )

    return optax.GradientTransformation(init_fn, update_fn)
