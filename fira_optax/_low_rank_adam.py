"""Adam in the low-rank subspace (HF-style moments), and the plain step for other leaves."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_optax import _masks
from fira_optax._projection import (
    check_hyperparams,
    is_low_rank,
    low_rank_shape,
    side_for_shape,
)


class LowRankAdamState(NamedTuple):
    """State of :func:`scale_by_low_rank_adam`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32`.
      mu: first moments, a tree like params: low-rank `(..., k, n)` / `(..., m, k)` for a
        projected leaf, the param's shape otherwise (dtype `mu_dtype` or float32).
      nu: second moments, same shapes as `mu`, float32.
    """

    count: jax.Array
    mu: Any
    nu: Any


def one_minus(x: jax.typing.ArrayLike) -> jax.Array:
    """`1 − x`, in float64 when `x` is a Python number (then rounded once to float32)."""
    if isinstance(x, (int, float)):
        return jnp.asarray(1.0 - float(x), jnp.float32)
    return 1.0 - jnp.asarray(x, jnp.float32)


def bias_correction(b1: jax.typing.ArrayLike, b2: jax.typing.ArrayLike, t: jax.Array) -> jax.Array:
    """`√(1 − b2^t) / (1 − b1^t)` with `1 − b^t = −expm1(t·log1p(−(1 − b)))`.

    Computed this way float32 keeps full relative accuracy (float32 `1 − 0.999**t` is off by
    1e-5), so the step size matches the float64 arithmetic of the PyTorch reference.
    """
    t = t.astype(jnp.float32)
    c1 = -jnp.expm1(t * jnp.log1p(-one_minus(b1)))
    c2 = -jnp.expm1(t * jnp.log1p(-one_minus(b2)))
    return jnp.sqrt(c2) / c1


def scale_by_low_rank_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    rank: int,
    proj_type: str = "std",
    projected: _masks.ProjectedSpec = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Adam with moments in the projected space (HF/PyTorch-AdamW style).

    For a projected leaf with low-rank gradient `R` (from :func:`fira_optax.project`):

    .. math::
      m ← b_1 m + (1-b_1) R,\\quad v ← b_2 v + (1-b_2) R^2,\\quad
      N = m / (\\sqrt{v} + ε)

    `ε` is added to the *un-bias-corrected* `√v`; the bias correction
    `√(1-b_2^t)/(1-b_1^t)` is not applied to `N` (which Fira's norm scaling and limiter see) but
    carried as the node's `step_scale`, applied by `project_back` to the whole update. Dense
    leaves (not projected) get the same step with `R = G`, bias correction included.

    `rank`, `proj_type` and `projected` must be the ones given to `project`: they set the
    moments' shapes at `init`. A mismatch raises a `ValueError` at trace time naming the leaf.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to `√v` (outside the root, before bias correction).
      rank: the rank given to `project`.
      proj_type: the proj_type given to `project`.
      projected: the `projected` given to `project`.
      mu_dtype: dtype of the first moment (default float32); `nu` is always float32.

    Returns:
      An `optax.GradientTransformation`.
    """
    check_hyperparams(rank=rank, proj_type=proj_type)
    mu_dtype = jnp.float32 if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        mask = _masks.projected_mask(params, projected)

        def moment_shape(p, is_projected):
            if not is_projected:
                return p.shape
            return low_rank_shape(p.shape, rank, side_for_shape(p.shape, proj_type))

        shapes = jax.tree.map(moment_shape, params, mask)
        is_shape = lambda x: isinstance(x, tuple)
        mu = jax.tree.map(lambda s: jnp.zeros(s, mu_dtype), shapes, is_leaf=is_shape)
        nu = jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), shapes, is_leaf=is_shape)
        return LowRankAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        count_inc = optax.safe_increment(state.count)
        correction = bias_correction(b1, b2, count_inc)
        b1_ = jnp.asarray(b1, jnp.float32)
        b2_ = jnp.asarray(b2, jnp.float32)

        def step(path, u, mu, nu):
            g = u.low_rank if is_low_rank(u) else u.astype(jnp.float32)
            if g.shape != mu.shape:
                kind = "low-rank gradient" if is_low_rank(u) else "dense (not projected) gradient"
                raise ValueError(
                    f"scale_by_low_rank_adam: leaf {_masks.path_str(path)!r} receives a {kind} of "
                    f"shape {g.shape} but its moments have shape {mu.shape}. Give "
                    "scale_by_low_rank_adam the same rank, proj_type and projected as project()."
                )
            mu = (b1_ * mu.astype(jnp.float32) + one_minus(b1) * g).astype(mu_dtype)
            nu = b2_ * nu + one_minus(b2) * jnp.square(g)
            direction = mu.astype(jnp.float32) / (jnp.sqrt(nu) + eps)
            if is_low_rank(u):
                return u.replace(direction=direction, step_scale=u.step_scale * correction), mu, nu
            return (correction * direction).astype(u.dtype), mu, nu

        flat_u, treedef = jax.tree.flatten_with_path(updates, is_leaf=is_low_rank)
        flat_mu = treedef.flatten_up_to(state.mu)
        flat_nu = treedef.flatten_up_to(state.nu)
        out = [step(p, u, m, v) for (p, u), m, v in zip(flat_u, flat_mu, flat_nu, strict=True)]
        new_updates = treedef.unflatten([o[0] for o in out])
        mu = treedef.unflatten([o[1] for o in out])
        nu = treedef.unflatten([o[2] for o in out])
        return new_updates, LowRankAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)
