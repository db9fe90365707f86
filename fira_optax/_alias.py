"""The optimizers: `scale_by_fira`, `scale_by_galore` (directions) and `fira`, `galore`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_optax import _masks
from fira_optax._limiter import limit_norm_growth
from fira_optax._low_rank_adam import scale_by_low_rank_adam
from fira_optax._project_back import project_back
from fira_optax._projection import project
from fira_optax._residual import norm_scale_residual


def _low_rank_direction(
    residual_blocks: tuple[optax.GradientTransformation, ...],
    *,
    rank: int,
    update_proj_gap: int,
    scale: jax.typing.ArrayLike,
    proj_type: str,
    b1: jax.typing.ArrayLike,
    b2: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    projected: _masks.ProjectedSpec,
    refresh: str,
    mu_dtype: Any,
) -> optax.GradientTransformation:
    """`project → scale_by_low_rank_adam → *residual_blocks → project_back`."""
    return optax.chain(
        project(rank, update_proj_gap, scale, proj_type, projected=projected, refresh=refresh),
        scale_by_low_rank_adam(
            b1, b2, eps, rank=rank, proj_type=proj_type, projected=projected, mu_dtype=mu_dtype
        ),
        *residual_blocks,
        project_back(),
    )


def scale_by_galore(
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    projected: _masks.ProjectedSpec = None,
    refresh: str = "svd",
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """GaLore's direction (no learning rate): see :func:`galore`."""
    return _low_rank_direction(
        (),
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        b1=b1,
        b2=b2,
        eps=eps,
        projected=projected,
        refresh=refresh,
        mu_dtype=mu_dtype,
    )


def scale_by_fira(
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    gamma: jax.typing.ArrayLike = 1.01,
    projected: _masks.ProjectedSpec = None,
    refresh: str = "svd",
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Fira's direction (no learning rate): see :func:`fira`.

    Equal to the building-block chain
    `project → scale_by_low_rank_adam → norm_scale_residual → limit_norm_growth → project_back`.
    """
    return _low_rank_direction(
        (norm_scale_residual(), limit_norm_growth(gamma, projected=projected)),
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        b1=b1,
        b2=b2,
        eps=eps,
        projected=projected,
        refresh=refresh,
        mu_dtype=mu_dtype,
    )


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate_and_decay`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32` (the schedule's input).
    """

    count: jax.Array


def scale_by_learning_rate_and_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule = 0.0,
) -> optax.GradientTransformation:
    """`W ← W − lr_t·u`, then decoupled decay *of the updated weights*: `W ← W − lr_t·wd·W`.

    This is the official (HF-style) order: the total update is
    `−lr_t·u − lr_t·wd·(W − lr_t·u)`. `optax.add_decayed_weights` would decay the old weights.

    Args:
      learning_rate: a scalar or a schedule `count -> lr`.
      weight_decay: a scalar or a schedule `count -> wd`.

    Returns:
      An `optax.GradientTransformation` (needs `params` when `weight_decay` is not 0).
    """
    static_no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0

    def init_fn(params):
        del params
        return ScaleByLearningRateState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        if static_no_decay:
            new = jax.tree.map(lambda u: (-lr * u.astype(jnp.float32)).astype(u.dtype), updates)
        else:
            if params is None:
                raise ValueError(
                    "fira/galore with weight_decay need the params: call "
                    "tx.update(grads, state, params)."
                )
            wd = weight_decay(state.count) if callable(weight_decay) else weight_decay
            wd = jnp.asarray(wd, jnp.float32)

            def decayed(u, p):
                step = -lr * u.astype(jnp.float32)
                return (step - lr * wd * (p.astype(jnp.float32) + step)).astype(u.dtype)

            new = jax.tree.map(decayed, updates, params)
        return new, ScaleByLearningRateState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    projected: _masks.ProjectedSpec = None,
    refresh: str = "svd",
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""GaLore: AdamW with its moments in a low-rank gradient subspace.

    The official `galore-torch==1.0` `GaLoreAdamW`. For a projected matrix (see :func:`fira`
    for the projection and the notation): `W ← W − s_t·α·back(N)`. Other leaves get the plain
    AdamW step. Unlike :func:`fira`, the part of the gradient outside the subspace is dropped.

    Args:
      learning_rate: a scalar or a schedule.
      rank: rank r of the projection (`k = min(r, m, n)` per matrix).
      update_proj_gap: T, steps between basis refreshes.
      scale: α.
      proj_type: "std", "reverse_std", "left" or "right".
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to `√v` (HF-style).
      weight_decay: decoupled, applied after the step to the updated weights, times lr_t.
      projected: which leaves are projected; see :func:`projected_mask`.
      refresh: "svd" or "randomized".
      mu_dtype: dtype of the first moment.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp, optax, fira_optax as fo
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> tx = fo.galore(1e-2, rank=2, projected={"w": True, "b": False})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> updates["w"].shape
      (8, 4)

    References:
      Zhao et al., 2024. GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection.
      https://arxiv.org/abs/2403.03507
    """
    return optax.chain(
        scale_by_galore(
            rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            b1=b1,
            b2=b2,
            eps=eps,
            projected=projected,
            refresh=refresh,
            mu_dtype=mu_dtype,
        ),
        scale_by_learning_rate_and_decay(learning_rate, weight_decay),
    )


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    gamma: jax.typing.ArrayLike = 1.01,
    projected: _masks.ProjectedSpec = None,
    refresh: str = "svd",
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Fira: full-rank training with a low-rank optimizer state.

    The official `fira==1.0.2` `FiraAdamW`, as an optax optimizer over a whole param tree.
    For each projected matrix `W` (m×n, gradient `G`), with `k = min(r, m, n)` and steps
    `t = 1, 2, …`:

    1. every `T` steps (`t = 1, T+1, …`) refresh the orthonormal basis `P` from the float32 SVD
       of the current `G`: left `P = U_{:, :k}` (m×k), right `P = V^\top_{:k, :}` (k×n); the
       side follows `proj_type` ("std": right if m ≥ n else left);
    2. project: `R = P^\top G` (left) or `R = G P^\top` (right); `back(X) = α P X` or `α X P`;
    3. Adam in the subspace (HF-style, ε outside the root, no bias correction here):

       .. math::
         m_t = β_1 m_{t-1} + (1-β_1) R,\quad v_t = β_2 v_{t-1} + (1-β_2) R^2,\quad
         N = \frac{m_t}{\sqrt{v_t} + ε}

    4. norm-based scaling of the residual, φ reduced over R's rank axis:

       .. math::
         φ = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}},\qquad
         S = φ \odot (G - \mathrm{back}(R))

    5. norm-growth limiter (first step: remember `g = ‖S‖`):

       .. math::
         λ = \max\left(\frac{\lVert S \rVert}{g + 10^{-8}}, γ\right) / γ,\quad
         S ← S/λ,\quad g ← \lVert S \rVert

    6. update, with `s_t = lr_t \sqrt{1-β_2^t} / (1-β_1^t)`:

       .. math::
         W ← W - s_t\,(\mathrm{back}(N) + S), \qquad W ← W - lr_t\, wd\, W

    Leaves that are not projected get the same AdamW step with `R = G` (no φ, no limiter).
    Moments and the limiter memory are carried across refreshes. The bases are sign-canonical
    (each basis vector's largest-magnitude entry is positive), so results do not depend on the
    backend's SVD.

    Args:
      learning_rate: a scalar or a schedule.
      rank: rank r of the projection (`k = min(r, m, n)` per matrix).
      update_proj_gap: T, steps between basis refreshes.
      scale: α (the paper uses 0.25 up to 350M, 0.0625 for 1B and 7B).
      proj_type: "std", "reverse_std", "left" or "right".
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to `√v` (HF-style).
      weight_decay: decoupled, applied after the step to the updated weights, times lr_t.
      gamma: γ, the limiter's allowed norm growth per step.
      projected: which leaves are projected; see :func:`projected_mask` (default: the ≥2-D
        leaves that are not embeddings, heads or norms).
      refresh: "svd" (exact, the reference) or "randomized" (subspace iteration).
      mu_dtype: dtype of the first moment (default float32).

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fira_optax as fo
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> tx = fo.fira(1e-2, rank=2, update_proj_gap=10, scale=0.25)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Chen et al., 2024. Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
      Constraint? https://arxiv.org/abs/2410.01623
    """
    return optax.chain(
        scale_by_fira(
            rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            b1=b1,
            b2=b2,
            eps=eps,
            gamma=gamma,
            projected=projected,
            refresh=refresh,
            mu_dtype=mu_dtype,
        ),
        scale_by_learning_rate_and_decay(learning_rate, weight_decay),
    )
