"""APOLLO and APOLLO-Mini as chains of the fira_optax blocks: `scale_by_apollo`, `apollo`,
`apollo_mini`.

APOLLO's update is Fira's residual path with α = 0: the raw gradient, scaled per channel (or
per matrix) by how Adam in a random low-rank subspace scales the projected gradient,
`project(refresh="random") → scale_by_low_rank_adam → norm_scale_gradient →
limit_norm_growth → project_back`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from fira_optax._alias import DecayMask, _with_learning_rate
from fira_optax._limiter import limit_norm_growth
from fira_optax._project import project
from fira_optax._project_back import project_back
from fira_optax._refresh import Refresh
from fira_optax._residual import norm_scale_gradient
from fira_optax._spec import DimensionNumbersSpec, ProjectedSpec, ProjectionSpec
from fira_optax._subspace import scale_by_low_rank_adam
from fira_optax._types import ProjType, RefreshSchedule, ScaleType

#: APOLLO-Mini: a rank-1 subspace and one scale per matrix (the official recommendation).
MINI_RANK = 1


def scale_by_apollo(
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    scale_type: ScaleType = "channel",
    proj_type: ProjType = "std",
    refresh: Refresh = "random",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    gamma: jax.typing.ArrayLike | None = 1.01,
    scale_front: bool = False,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """APOLLO's direction (no learning rate, no weight decay): see :func:`apollo`.

    Equal to the building-block chain (one :class:`ProjectionSpec` shared by the stateful
    blocks; the limiter only when `gamma` is not None)::

      optax.chain(
          fo.project(spec, update_proj_gap=..., refresh="random", seed=...),
          fo.scale_by_low_rank_adam(spec, b1, b2, eps),
          fo.norm_scale_gradient(scale_type, scale=scale, scale_front=scale_front),
          fo.limit_norm_growth(spec, gamma),
          fo.project_back(),
      )

    Args:
      rank: rank r of the auxiliary subspace (`k = min(r, m, n)` per matrix).
      update_proj_gap: T, steps between refreshes of the projection.
      scale: APOLLO's scale; the update of a projected matrix is multiplied by `√scale`.
      scale_type: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
      proj_type: "std", "reverse_std", "left" or "right".
      refresh: "random" (APOLLO's Gaussian projection), "svd" (the official `proj="svd"`),
        "randomized", "random_orthonormal" or a callable; see :func:`project`.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to `√v` (HF-style).
      gamma: the limiter's allowed norm growth per step (≥ 1), or None: no limiter (the
        official `disable_nl=True`).
      scale_front: apply `√scale` before the limiter instead of after it.
      projected: which leaves are projected; see :class:`ProjectionSpec`.
      dimension_numbers: how a leaf is read as matrices; see :class:`ProjectionSpec`.
      refresh_schedule: "official" or "staggered"; see :func:`project`.
      refresh_shardings: None, or the params' shardings (used by the "svd" and
        "randomized" refreshes; a random projection reads no gradient); see :func:`project`.
      mu_dtype: dtype of the first moment (default float32).
      seed: the seed of the random projections (see :func:`project`).

    Returns:
      An `optax.GradientTransformation`.
    """
    spec = ProjectionSpec(rank, proj_type, projected, dimension_numbers)
    limiter = () if gamma is None else (limit_norm_growth(spec, gamma),)
    return optax.chain(
        project(
            spec,
            update_proj_gap=update_proj_gap,
            refresh=refresh,
            refresh_schedule=refresh_schedule,
            refresh_shardings=refresh_shardings,
            seed=seed,
        ),
        scale_by_low_rank_adam(spec, b1, b2, eps, mu_dtype=mu_dtype),
        norm_scale_gradient(scale_type, scale=scale, scale_front=scale_front),
        *limiter,
        project_back(),
    )


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    scale_type: ScaleType = "channel",
    proj_type: ProjType = "std",
    refresh: Refresh = "random",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    gamma: jax.typing.ArrayLike | None = 1.01,
    scale_front: bool = False,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: DecayMask = None,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""APOLLO: SGD-like memory, AdamW-level performance.

    The official `apollo-torch==1.0.3` `APOLLOAdamW`, as an optax optimizer over a whole
    param tree. Adam runs on a random low-rank projection of each gradient only to estimate,
    per channel, how much Adam would scale it; the update is the *full* gradient times that
    estimate. For each projected matrix `W` (m×n, gradient `G`), with `k = min(r, m, n)` and
    steps `t = 1, 2, …`:

    1. every `T` steps (`t = 1, T+1, …`) draw a new projection `P` with i.i.d. `N(0, 1/k)`
       entries (`refresh="random"`; or the SVD basis of `G` with `refresh="svd"`): left
       `P` (m×k) or right `P` (k×n), the side from `proj_type` ("std": right if m ≥ n else
       left, as in :func:`fira`);
    2. project: `R = P^\top G` (left, k×n) or `R = G P^\top` (right, m×k);
    3. Adam in the subspace (HF-style, ε outside the root, no bias correction here):

       .. math::
         m_t = β_1 m_{t-1} + (1-β_1) R,\quad v_t = β_2 v_{t-1} + (1-β_2) R^2,\quad
         N = \frac{m_t}{\sqrt{v_t} + ε}

    4. scale the raw gradient, per channel (`scale_type="channel"`: norms over R's rank
       axis, one factor per column of G for a left projection, per row for a right one) or
       per matrix (`"tensor"`: Frobenius norms):

       .. math::
         φ = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}},\qquad S = φ \odot G

    5. Fira's norm-growth limiter (unless `gamma` is None; first step: remember
       `g = ‖S‖`):

       .. math::
         λ = \max\left(\frac{\lVert S \rVert}{g + 10^{-8}}, γ\right) / γ,\quad
         S ← S/λ,\quad g ← \lVert S \rVert

       with `scale_front` the limiter acts on `√scale · S` instead (step 6 then does not
       multiply by `√scale` again);
    6. update, with `s_t = lr_t \sqrt{1-β_2^t} / (1-β_1^t)`:

       .. math::
         W ← W - s_t \sqrt{\mathrm{scale}}\; S, \qquad W ← W - lr_t\, wd\, W

    Leaves that are not projected get the plain AdamW step (no φ, no `√scale`, no limiter).
    The moments and the limiter's memory are carried across refreshes. The state per
    projected matrix is the projection and two moments at the low-rank shape (`k×n` or
    `m×k`) and one limiter scalar. This is Fira with α = 0 (the low-rank direction is not
    added back, the residual is the whole gradient), built from the same blocks:
    :func:`scale_by_apollo`.

    Where we differ from the official code (all else is step for step the same, tested):

    - the random projections come from JAX's PRNG (a key per `seed`, step and leaf key path)
      instead of torch's generator seeded by the parameter's index: the same distribution,
      other draws (tested: replaying the official draws gives the official trajectory);
    - `k = min(r, m, n)` for every refresh; the official random projection keeps all `r`
      dimensions when `r > min(m, n)` (its SVD projection is truncated as ours);
    - `scale_type="channel"` always reduces over R's rank axis (the paper's channel-wise
      scaling). The official code reduces over dim 0 for wide and dim 1 for other
      matrices, which is the rank axis whenever the side is the "std" one; on the other side
      (`reverse_std`; `left` on tall or square, `right` on wide matrices) it crashes, except
      at `k = 1`, where broadcasting makes it the tensor-wise scale;
    - the projection, the norms and the moments' math run in float32 (the official code
      projects in the parameter's dtype); bias corrections in float32 via
      `expm1`/`log1p`; idle matrices (an exactly zero gradient) are skipped as PyTorch skips
      a parameter whose `grad` is None, and a non-finite norm is not remembered by the
      limiter — all as in :func:`fira`.

    Args:
      learning_rate: a scalar or a schedule.
      rank: rank r of the auxiliary subspace (`k = min(r, m, n)` per matrix).
      update_proj_gap: T, steps between refreshes of the projection.
      scale: APOLLO's scale: the update of a projected matrix is multiplied by `√scale`
        (the official default 1; larger for small ranks, e.g. 128 at rank 1).
      scale_type: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
      proj_type: "std", "reverse_std", "left" or "right".
      refresh: "random" (APOLLO's Gaussian projection), "svd" (the official `proj="svd"`:
        the sign-canonical top-k singular vectors), "randomized", "random_orthonormal" or a
        callable; see :func:`project`.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to `√v` (HF-style).
      gamma: γ ≥ 1, the limiter's allowed norm growth per step (the official 1.01), or
        None: no limiter (the official `disable_nl=True`).
      scale_front: multiply by `√scale` before the limiter instead of after it (the
        official `scale_front`; recommended for short warm-ups).
      weight_decay: None (no decay) or decoupled decay, applied after the step to the
        updated weights, times lr_t. An idle matrix (a projected matrix whose gradient is
        exactly zero) is not decayed, as PyTorch skips a parameter without a gradient.
      mask: which leaves are decayed, as in `optax.adamw`: None (all), a pytree of bools
        like params (or a prefix of it; True: decayed) or a callable `params -> that
        pytree`. Idle matrices are not decayed either way.
      projected: which leaves are projected; see :class:`ProjectionSpec`.
      dimension_numbers: how a leaf is read as (a stack of) matrices; see
        :class:`ProjectionSpec`.
      refresh_schedule: "official" (every `T` steps, all matrices together) or
        "staggered"; see :func:`project`.
      refresh_shardings: None, or the params' shardings (they divide the "svd" and
        "randomized" refreshes over the devices; a random projection reads no gradient);
        see :func:`project`.
      mu_dtype: dtype of the first moment (default float32).
      seed: the seed of the random projections: each refresh of each matrix draws from a
        key derived from it, the step count and the leaf's key path.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fira_optax as fo
      >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
      >>> tx = fo.apollo(1e-2, rank=2, update_proj_gap=10, projected={"w": True, "b": False})
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> state[0][0].bases["w"].shape  # a random right projection, k×n
      (2, 8)
      >>> state[0][1].mu["w"].shape  # the first moment, m×k
      (16, 2)

    References:
      Zhu et al., 2024. APOLLO: SGD-like Memory, AdamW-level Performance.
      https://arxiv.org/abs/2412.05270
    """
    return _with_learning_rate(
        scale_by_apollo(
            rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            scale_type=scale_type,
            proj_type=proj_type,
            refresh=refresh,
            b1=b1,
            b2=b2,
            eps=eps,
            gamma=gamma,
            scale_front=scale_front,
            projected=projected,
            dimension_numbers=dimension_numbers,
            refresh_schedule=refresh_schedule,
            refresh_shardings=refresh_shardings,
            mu_dtype=mu_dtype,
            seed=seed,
        ),
        learning_rate,
        weight_decay,
        ProjectionSpec(rank, proj_type, projected, dimension_numbers),
        mask,
    )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 128.0,
    proj_type: ProjType = "std",
    refresh: Refresh = "random",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    gamma: jax.typing.ArrayLike | None = 1.01,
    scale_front: bool = False,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: DecayMask = None,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""APOLLO-Mini: APOLLO with a rank-1 subspace and one scale per matrix.

    :func:`apollo` with `rank=1` and `scale_type="tensor"` — the official recommendation
    for APOLLO-Mini (`'rank': 1, 'proj': 'random', 'scale_type': 'tensor', 'scale': 128`):
    per projected matrix

    .. math::
      φ = \frac{\lVert N \rVert_F}{\lVert R \rVert_F + 10^{-8}},\qquad
      W ← W - s_t \sqrt{\mathrm{scale}}\; \mathrm{limit}(φ\, G)

    with `R` the gradient projected on one random direction (`1×n` or `m×1`) and `N` Adam's
    direction for it: the optimizer state is two vectors and the projection per matrix, about
    SGD's memory. See :func:`apollo` for the steps, the arguments and where we differ from the
    official code.

    Args:
      learning_rate: a scalar or a schedule.
      update_proj_gap: T, steps between refreshes of the projection.
      scale: APOLLO's scale (default 128, the official recommendation at rank 1; try more
        for larger models): the update is multiplied by `√scale`.
      proj_type: "std", "reverse_std", "left" or "right".
      refresh: "random" (APOLLO's), "svd" or another strategy; see :func:`project`.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to `√v` (HF-style).
      gamma: the limiter's allowed norm growth per step, or None (no limiter).
      scale_front: multiply by `√scale` before the limiter instead of after it
        (recommended by the official code for short warm-ups).
      weight_decay: None (no decay) or decoupled decay of the updated weights, times lr_t.
      mask: which leaves are decayed (as in :func:`apollo`).
      projected: which leaves are projected; see :class:`ProjectionSpec`.
      dimension_numbers: how a leaf is read as matrices; see :class:`ProjectionSpec`.
      refresh_schedule: "official" or "staggered"; see :func:`project`.
      refresh_shardings: None, or the params' shardings; see :func:`project`.
      mu_dtype: dtype of the first moment (default float32).
      seed: the seed of the random projections.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax, jax.numpy as jnp, fira_optax as fo
      >>> params = {"w": jnp.ones((16, 8))}
      >>> tx = fo.apollo_mini(1e-2, projected={"w": True})
      >>> state = tx.init(params)
      >>> updates, state = jax.jit(tx.update)(params, state, params)
      >>> state[0][1].mu["w"].shape  # one moment entry per row
      (16, 1)

    References:
      Zhu et al., 2024. APOLLO: SGD-like Memory, AdamW-level Performance.
      https://arxiv.org/abs/2412.05270
    """
    return apollo(
        learning_rate,
        MINI_RANK,
        update_proj_gap=update_proj_gap,
        scale=scale,
        scale_type="tensor",
        proj_type=proj_type,
        refresh=refresh,
        b1=b1,
        b2=b2,
        eps=eps,
        gamma=gamma,
        scale_front=scale_front,
        weight_decay=weight_decay,
        mask=mask,
        projected=projected,
        dimension_numbers=dimension_numbers,
        refresh_schedule=refresh_schedule,
        refresh_shardings=refresh_shardings,
        mu_dtype=mu_dtype,
        seed=seed,
    )
