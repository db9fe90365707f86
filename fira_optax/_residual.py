"""Norm-based scaling: Fira's residual (the part of G outside the subspace), APOLLO's gradient.

Both compare the subspace optimizer's direction `N` with the low-rank gradient `R`,
`φ = ‖N‖ / (‖R‖ + 1e-8)`, and apply that ratio to a full-size matrix: Fira to the residual
`G − α·back(R)` (added to `α·back(N)`), APOLLO to the raw gradient `G` (alone).
"""

from __future__ import annotations

from typing import get_args

import jax
import jax.numpy as jnp
import optax

from fira_optax._checks import check_real
from fira_optax._node import check_residual_order, map_nodes
from fira_optax._shapes import rank_axis
from fira_optax._types import ScaleType, StateFreeRule

#: APOLLO's scale types: one φ per channel (row or column of G), or one per matrix.
SCALE_TYPES = get_args(ScaleType)

#: Added to ‖R‖ in φ = ‖N‖ / (‖R‖ + NORM_EPS), as in the official code.
NORM_EPS = 1e-8


def residual_scale(direction: jnp.ndarray, low_rank: jnp.ndarray, side: str) -> jnp.ndarray:
    """`φ = ‖N‖ / (‖R‖ + 1e-8)` reduced over the rank (k) axis, shaped to broadcast on `G`.

    Left side: `R` is `k×n`, φ is `1×n` (one factor per column of G); right side: `R` is `m×k`,
    φ is `m×1` (one per row). This is the official "R's smaller dimension" rule on every shape
    except a left projection with `k == n`, where the official code reduces the other axis
    (and crashes unless the matrix is square); see docs/semantics.md, "Where we differ from the
    official code".

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
        return map_nodes(lambda u: u.replace(phi=phi(u)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def tensor_scale(direction: jnp.ndarray, low_rank: jnp.ndarray) -> jnp.ndarray:
    """`φ = ‖N‖_F / (‖R‖_F + 1e-8)`, one per matrix, shaped `(..., 1, 1)`."""
    norm_n = jnp.linalg.norm(direction, axis=(-2, -1), keepdims=True)
    norm_r = jnp.linalg.norm(low_rank, axis=(-2, -1), keepdims=True)
    return norm_n / (norm_r + NORM_EPS)


def norm_scale_gradient(
    scale_type: ScaleType = "channel",
    *,
    scale: jax.typing.ArrayLike = 1.0,
    scale_front: bool = False,
) -> optax.GradientTransformation:
    r"""APOLLO's update: the raw gradient, scaled like the low-rank direction.

    With the direction `N` of the subspace optimizer and the low-rank gradient `R`,

    .. math::
      S = φ \odot G,\qquad φ = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}}

    per channel (`scale_type="channel"`: reduced over R's rank axis, one factor per column
    of G for a left projection, per row for a right one: APOLLO — the official code's axis
    wherever its projection side is the "std" one, see :func:`fira_optax.apollo`) or per
    matrix (`"tensor"`: Frobenius norms, one factor per matrix: APOLLO-Mini). This is Fira's
    residual path with α = 0 — `α·back(N) + φ ⊙ (G − α·back(R)) = φ ⊙ G` — so the block sets
    the node's α to 0 and marks it (`back_projected=False`): `project_back` and the limiter
    then never multiply by the basis (one elementwise pass over G). The basis only serves to
    estimate φ, which is why a random one (`project(refresh="random")`) does.

    APOLLO's `scale` multiplies the update by `√scale`: with `scale_front` before
    :func:`fira_optax.limit_norm_growth` (the limiter sees `√scale · φ ⊙ G`), else after it
    (in the node's `bias_correction`: the limiter sees `φ ⊙ G`). The two differ only through the
    limiter's 1e-8.

    Must follow the subspace optimizer, once, in place of
    :func:`fira_optax.norm_scale_residual`; elsewhere it raises at trace time, naming the
    order. Dense (not projected) leaves pass through, unscaled.

    Args:
      scale_type: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
      scale: APOLLO's scale (> 0); the update is multiplied by `√scale`.
      scale_front: apply `√scale` before the limiter (APOLLO's `scale_front`).

    Returns:
      A stateless `optax.GradientTransformation`.

    References:
      Zhu et al., 2024. APOLLO: SGD-like Memory, AdamW-level Performance.
      https://arxiv.org/abs/2412.05270
    """
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"Unknown scale_type {scale_type!r}; expected one of {SCALE_TYPES}.")
    check_real("scale", scale, low=0.0, low_open=True, what="a finite number > 0")

    def scaled(u):
        check_residual_order("norm_scale_gradient", u)
        if scale_type == "channel":
            phi = residual_scale(u.direction, u.low_rank, u.side)
        else:
            phi = tensor_scale(u.direction, u.low_rank)
        root = jnp.sqrt(jnp.asarray(scale, jnp.float32))
        if scale_front:
            phi, correction = root * phi, u.bias_correction
        else:
            correction = u.bias_correction * root
        return u.replace(
            phi=phi,
            bias_correction=correction,
            alpha=jnp.zeros([], jnp.float32),
            back_projected=False,
        )

    def update_fn(updates, state, params=None):
        del params
        return map_nodes(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


#: FRUGAL's state-free rules for the residual: signSGD or SGD.
STATE_FREE_RULES = get_args(StateFreeRule)

_STATE_FREE_ORDER = (
    "project → subspace optimizer (scale_by_low_rank_adam / in_subspace) → "
    "state_free_residual → project_back"
)


def state_free_residual(
    rule: StateFreeRule = "sign", learning_rate_ratio: jax.typing.ArrayLike = 1.0
) -> optax.GradientTransformation:
    r"""FRUGAL's state-free step on the residual, the part of `G` outside the subspace.

    With the residual `E = G − α·back(R)` and `c = learning_rate_ratio`,

    .. math::
      S = c\,\mathrm{sign}(E)\ \ (\text{rule="sign": signSGD}),\qquad
      S = c\,E\ \ (\text{rule="sgd": SGD}),

    added to the subspace optimizer's update: the node stands for
    `bias_correction · (α·back(N) + S)`, so once the learning rate has multiplied it an entry
    outside the subspace moves by `lr·c·sign(E)` (or `lr·c·E`). After
    `scale_by_low_rank_adam(bias_correction="torch")` (as in :func:`fira_optax.frugal`) the
    node's `bias_correction` is 1 before the learning rate, and `c` is the ratio of the
    state-free learning rate to the subspace's (the official `inactive_lr_scale`); after the
    default HF-style Adam it is Adam's bias correction `√(1-β₂ᵗ)/(1-β₁ᵗ)`, which then also
    multiplies `S`. Nothing is stored: `E` is recomputed from `G` at every step.

    **Cost.** "sgd" is Fira's implicit residual with `φ = c`: `project_back` fuses it into its
    one matmul, nothing more. `sign(E)` is not linear in `G`, so for "sign" `project_back`
    builds `back(R)` explicitly: one more `m×k×n` matmul and an `m×n` temporary per matrix.
    When the subspace is the whole projected side (`k = n` for a right projection, `k = m` for
    a left one) `E` is only round-off, whose sign would be a full `±c` step on every entry;
    the state-free step is then zero (the official code takes that sign) and costs nothing.

    :func:`fira_optax.limit_norm_growth` refuses a sign residual (its norm is
    `c·√(non-zero entries)`, fixed by construction: there is no growth to limit); with "sgd"
    it applies as to Fira's residual. Must follow the subspace optimizer, once, in place of
    :func:`fira_optax.norm_scale_residual`; elsewhere it raises at trace time, naming the
    order. Dense (not projected) leaves pass through.

    Args:
      rule: "sign" (signSGD, FRUGAL's default) or "sgd".
      learning_rate_ratio: `c ≥ 0`, the state-free learning rate relative to the subspace's
        (FRUGAL: 1 for pre-training, 0.1 for fine-tuning).

    Returns:
      A stateless `optax.GradientTransformation`.

    References:
      Zmushko et al., 2024. FRUGAL: Memory-Efficient Optimization by Reducing State Overhead
      for Scalable Training. https://arxiv.org/abs/2411.07837
    """
    if rule not in STATE_FREE_RULES:
        raise ValueError(f"Unknown rule {rule!r}; expected one of {STATE_FREE_RULES}.")
    check_real(
        "learning_rate_ratio",
        learning_rate_ratio,
        low=0.0,
        low_open=False,
        what="a finite number >= 0 (the state-free learning rate relative to the subspace's)",
    )

    def residual(u):
        if not u.has_direction:
            raise ValueError(
                f"state_free_residual: leaf {u.plan.path!r} has no direction yet: put "
                "state_free_residual() after the subspace optimizer (its step is added to that "
                f"optimizer's update, at its bias correction). Keep the order {_STATE_FREE_ORDER}."
            )
        if u.phi is not None:
            raise ValueError(
                f"state_free_residual: leaf {u.plan.path!r} already has a residual: use one "
                "of state_free_residual() and norm_scale_residual(), once. Keep the order "
                f"{_STATE_FREE_ORDER}."
            )
        shape = list(u.low_rank.shape)
        shape[rank_axis(u.side)] = 1
        ratio = jnp.full(shape, learning_rate_ratio, jnp.float32)
        return u.replace(phi=ratio, residual_sign=rule == "sign")

    def update_fn(updates, state, params=None):
        del params
        return map_nodes(residual, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
