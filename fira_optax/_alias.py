"""The optimizers: `scale_by_fira`, `scale_by_galore` (directions) and `fira`, `galore`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fira_optax._checks import MAX_GAP, as_int, concrete
from fira_optax._limiter import limit_norm_growth
from fira_optax._project import project
from fira_optax._project_back import project_back
from fira_optax._refresh import Refresh, check_refresh, left_form_basis, svd_basis
from fira_optax._residual import norm_scale_residual
from fira_optax._shapes import active as matrices_active
from fira_optax._spec import BoolTree, DimensionNumbersSpec, ProjectedSpec, ProjectionSpec
from fira_optax._subspace import in_subspace, scale_by_low_rank_adam
from fira_optax._types import ProjType, RefreshSchedule

#: `mask=` of the weight decay (optax.adamw's): a pytree of bools like params (or a prefix of
#: it), or a callable `params -> that pytree`; True: the leaf is decayed.
DecayMask = BoolTree | Callable[[optax.Params], BoolTree] | None


def _low_rank_direction(
    fira: bool,
    *,
    rank: int,
    update_proj_gap: int,
    scale: jax.typing.ArrayLike,
    proj_type: ProjType,
    b1: jax.typing.ArrayLike,
    b2: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    gamma: jax.typing.ArrayLike,
    projected: ProjectedSpec,
    dimension_numbers: DimensionNumbersSpec,
    refresh: Refresh,
    refresh_schedule: RefreshSchedule,
    refresh_shardings: Any,
    mu_dtype: Any,
    base_optimizer: optax.GradientTransformation | None,
    seed: int,
) -> optax.GradientTransformation:
    """`project → subspace optimizer → [norm_scale_residual → limit_norm_growth] →
    project_back`, every stateful block sharing one spec."""
    spec = ProjectionSpec(rank, proj_type, projected, dimension_numbers)
    if base_optimizer is None:
        subspace = scale_by_low_rank_adam(spec, b1, b2, eps, mu_dtype=mu_dtype)
    else:
        if mu_dtype is not None:
            raise ValueError(
                "mu_dtype is an option of the default subspace Adam; with "
                "base_optimizer=, set the dtype in the base optimizer."
            )
        subspace = in_subspace(spec, base_optimizer)
    residual = (norm_scale_residual(), limit_norm_growth(spec, gamma)) if fira else ()
    return optax.chain(
        project(
            spec,
            update_proj_gap=update_proj_gap,
            scale=scale,
            refresh=refresh,
            refresh_schedule=refresh_schedule,
            refresh_shardings=refresh_shardings,
            seed=seed,
        ),
        subspace,
        *residual,
        project_back(),
    )


def scale_by_galore(
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "svd",
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """GaLore's direction (no learning rate): see :func:`galore`."""
    return _low_rank_direction(
        False,
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        b1=b1,
        b2=b2,
        eps=eps,
        gamma=1.01,
        projected=projected,
        dimension_numbers=dimension_numbers,
        refresh=refresh,
        refresh_schedule=refresh_schedule,
        refresh_shardings=refresh_shardings,
        mu_dtype=mu_dtype,
        base_optimizer=base_optimizer,
        seed=seed,
    )


def scale_by_fira(
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    gamma: jax.typing.ArrayLike = 1.01,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "svd",
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """Fira's direction (no learning rate): see :func:`fira`.

    Equal to the building-block chain
    `project → scale_by_low_rank_adam → norm_scale_residual → limit_norm_growth → project_back`
    with one :class:`ProjectionSpec` shared by the stateful blocks.
    """
    return _low_rank_direction(
        True,
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        b1=b1,
        b2=b2,
        eps=eps,
        gamma=gamma,
        projected=projected,
        dimension_numbers=dimension_numbers,
        refresh=refresh,
        refresh_schedule=refresh_schedule,
        refresh_shardings=refresh_shardings,
        mu_dtype=mu_dtype,
        base_optimizer=base_optimizer,
        seed=seed,
    )


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate_and_decay`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32` (the schedule's input).
    """

    count: jax.Array


def scale_by_learning_rate_and_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule | None = None,
    *,
    mask: DecayMask = None,
) -> optax.GradientTransformation:
    """`W ← W − lr_t·u`, then decoupled decay *of the updated weights*: `W ← W − lr_t·wd·W`.

    This is the official (HF-style) order: the total update is
    `−lr_t·u − lr_t·wd·(W − lr_t·u)`. `optax.add_decayed_weights` would decay the old weights.

    Args:
      learning_rate: a scalar or a schedule `count -> lr`.
      weight_decay: None or 0 (no decay), a scalar or a schedule `count -> wd`.
      mask: which leaves are decayed, as in `optax.adamw`: None (all), a pytree of bools like
        params (or a prefix of it; True: decayed) or a callable `params -> that pytree`.

    Returns:
      An `optax.GradientTransformation`. It needs `params` when there is weight decay. Under
      `optax.inject_hyperparams` a `weight_decay` that was passed becomes a (traced) array
      whose value cannot be checked at trace time, so it needs `params` even when it is 0;
      the default (None) stays static and needs none.
    """
    no_decay = weight_decay is None or (
        not callable(weight_decay)
        and (known := concrete(weight_decay)) is not None
        and not known.any()
    )

    def init_fn(params):
        del params
        return ScaleByLearningRateState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, decays=None):
        # `decays` (internal, from fira/galore): a list aligned with the update leaves, None
        # (decay) or a bool array of the leaf's shape (decay where True): idle matrices are
        # not decayed. The user's `mask` narrows it further.
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        if no_decay:
            new = jax.tree.map(lambda u: (-lr * u.astype(jnp.float32)).astype(u.dtype), updates)
        else:
            if params is None:
                raise ValueError(
                    f"fira/galore with weight_decay={weight_decay!r} need the params: call "
                    "tx.update(grads, state, params). (Under optax.inject_hyperparams a "
                    "weight_decay you pass is a traced array even when it is 0: leave it at "
                    "its default None, or list 'weight_decay' in static_args.)"
                )
            wd = weight_decay(state.count) if callable(weight_decay) else weight_decay
            wd = jnp.asarray(wd, jnp.float32)

            def decayed(u, p, keep=None):
                step = -lr * u.astype(jnp.float32)
                if keep is False:
                    return step.astype(u.dtype)
                decay = lr * wd * (p.astype(jnp.float32) + step)
                if keep is not None:
                    decay = jnp.where(keep, decay, 0.0)
                return (step - decay).astype(u.dtype)

            leaves, treedef = jax.tree.flatten(updates)
            keeps = decayed_where(mask, params, treedef, decays)
            pairs = zip(leaves, treedef.flatten_up_to(params), keeps, strict=True)
            new = treedef.unflatten([decayed(u, p, keep) for u, p, keep in pairs])
        return new, ScaleByLearningRateState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def decayed_where(mask: DecayMask, params: Any, treedef: Any, decays: list | None) -> list:
    """Where each leaf (of `treedef`) is decayed: None (everywhere), False (nowhere) or a
    bool array of the leaf's shape: the user's `mask` (optax.adamw's) and the active
    matrices (`decays`, from :func:`_active_matrices`, or None)."""
    decays = [None] * treedef.num_leaves if decays is None else decays
    if mask is None:
        return decays
    tree = mask(params) if callable(mask) else mask
    try:  # a pytree like params, or a prefix of it
        flat = treedef.flatten_up_to(
            jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            "mask: expected a pytree of bools like params (or a prefix of it), or a callable "
            f"returning one; the tree does not match params: {e} (Under "
            "optax.inject_hyperparams a function passed as mask is called as a schedule: "
            "list 'mask' in static_args.)"
        ) from None

    def keep(m, active):
        if isinstance(m, (bool, np.bool_)):
            return active if m else False
        m = jnp.asarray(m, bool)
        return m if active is None else m & active

    return [keep(m, active) for m, active in zip(flat, decays, strict=True)]


def _active_matrices(grads: Any, spec: ProjectionSpec) -> list:
    """A list aligned with `jax.tree.leaves(grads)`: for a projected leaf, a bool array of
    the leaf's shape, True on the matrices whose gradient is not exactly zero; None for the
    other leaves."""

    def active(grad, plan):
        if plan is None:
            return None
        grad_mxn = plan.view.to_matrix(grad)
        active_11 = matrices_active(grad_mxn, keepdims=True)
        return plan.view.from_matrix(jnp.broadcast_to(active_11, grad_mxn.shape))

    plans = spec.flat_plans(grads)
    return [active(g, p) for g, p in zip(jax.tree.leaves(grads), plans, strict=True)]


def _with_learning_rate(
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule | None,
    spec: ProjectionSpec,
    mask: DecayMask = None,
) -> optax.GradientTransformation:
    """`optax.chain(direction, scale_by_learning_rate_and_decay(...))` (the same state),
    whose weight decay skips idle matrices (an exactly zero gradient), as PyTorch skips a
    parameter whose `grad` is None, and the leaves `mask` leaves out."""
    lr = scale_by_learning_rate_and_decay(learning_rate, weight_decay, mask=mask)
    if weight_decay is None:
        return optax.chain(direction, lr)
    direction = optax.with_extra_args_support(direction)

    def init_fn(params):
        return direction.init(params), lr.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        decays = _active_matrices(updates, spec)
        updates, direction_state = direction.update(updates, state[0], params, **extra_args)
        updates, lr_state = lr.update(updates, state[1], params, decays=decays)
        return updates, (direction_state, lr_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: DecayMask = None,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "svd",
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
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
      weight_decay: None (no decay) or decoupled decay, applied after the step to the
        updated weights, times lr_t. An idle matrix (a projected matrix whose gradient is
        exactly zero) is not decayed, as PyTorch skips a parameter without a gradient.
      mask: which leaves are decayed, as in `optax.adamw`: None (all), a pytree of bools
        like params (or a prefix of it; True: decayed) or a callable `params -> that
        pytree`. Idle matrices are not decayed either way.
      projected: which leaves are projected; see :class:`ProjectionSpec`.
      dimension_numbers: how a leaf is read as matrices; see :class:`ProjectionSpec`.
      refresh: "svd", "randomized", "random", "random_orthonormal" or a callable; see
        :func:`project`.
      refresh_schedule: "official" (every matrix refreshes on the same step) or
        "staggered" (each matrix at its own offset in the `T`-step window, so every step
        carries about `1/T` of the refresh work); see :func:`project`.
      refresh_shardings: None, or the params' shardings (a tree of `NamedSharding`s, as
        given to :func:`optimizer_state_shardings`): the refresh step then divides its work
        over their devices; see :func:`project`.
      mu_dtype: dtype of the first moment.
      base_optimizer: None (the official low-rank Adam) or any gradient-only optax
        transform to run inside the subspace (see :func:`in_subspace`; `b1`, `b2`, `eps` and
        `mu_dtype` are then unused).
      seed: the seed of the random refresh strategies (see :func:`project`).

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
    return _with_learning_rate(
        scale_by_galore(
            rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            b1=b1,
            b2=b2,
            eps=eps,
            projected=projected,
            dimension_numbers=dimension_numbers,
            refresh=refresh,
            refresh_schedule=refresh_schedule,
            refresh_shardings=refresh_shardings,
            mu_dtype=mu_dtype,
            base_optimizer=base_optimizer,
            seed=seed,
        ),
        learning_rate,
        weight_decay,
        ProjectionSpec(rank, proj_type, projected, dimension_numbers),
        mask,
    )


def _golore_refresh(svd_steps: int, refresh: Refresh) -> Refresh:
    """GoLore's strategy: the top-k SVD while a matrix's step count is below `svd_steps`,
    `refresh` (a random strategy, or a callable) afterwards."""

    def strategy(grad_mxn, basis, key, *, k, side, path, step):
        def random():
            if callable(refresh):
                return refresh(grad_mxn, basis, key, k=k, side=side, path=path, step=step)
            a_mxn = grad_mxn if side == "left" else grad_mxn.T
            old = basis if side == "left" else basis.T
            new = left_form_basis(refresh, a_mxn, old, k, key)
            return new if side == "left" else new.T

        if svd_steps == 0:
            return random()
        return jax.lax.cond(step < svd_steps, lambda: svd_basis(grad_mxn, k, side), random)

    return strategy


def scale_by_golore(
    rank: int,
    *,
    update_proj_gap: int = 200,
    svd_steps: int = 0,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "random_orthonormal",
    refresh_schedule: RefreshSchedule = "official",
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """GoLore's direction (no learning rate): see :func:`golore`.

    The chain `project(refresh=<SVD, then random>) → scale_by_low_rank_adam(
    on_refresh="transport") → project_back` with one :class:`ProjectionSpec`.
    """
    svd_steps = as_int("svd_steps", svd_steps, low=0, high=MAX_GAP)
    check_refresh(refresh)
    if refresh in ("svd", "randomized"):
        raise ValueError(
            f"golore: refresh={refresh!r} is a data-driven strategy; GoLore's refreshes after "
            "svd_steps are random: 'random_orthonormal' (the paper's), 'random' or a callable."
        )
    spec = ProjectionSpec(rank, proj_type, projected, dimension_numbers)
    return optax.chain(
        project(
            spec,
            update_proj_gap=update_proj_gap,
            scale=scale,
            refresh=_golore_refresh(svd_steps, refresh),
            refresh_schedule=refresh_schedule,
            seed=seed,
        ),
        scale_by_low_rank_adam(spec, b1, b2, eps, mu_dtype=mu_dtype, on_refresh="transport"),
        project_back(),
    )


def golore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    update_proj_gap: int = 200,
    svd_steps: int = 0,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: DecayMask = None,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "random_orthonormal",
    refresh_schedule: RefreshSchedule = "official",
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""GoLore: GaLore with random orthonormal projections, which provably converges.

    GaLore's SVD basis follows the stochastic gradient; when the true gradient is small the
    gradient noise dominates it and GaLore stalls. GoLore refreshes with a basis drawn
    uniformly from the Stiefel manifold instead (independent of the noise), after an optional
    SVD phase. For a projected matrix (see :func:`fira` for the projection and notation),
    with `s` the matrix's step count before this step and `T = update_proj_gap`:

    1. when `s mod T = 0`: `P ←` the top-k SVD basis of `G` if `s < svd_steps`, else a
       Haar-uniform orthonormal k-frame (`refresh`); on every refresh after the first the
       first moment is carried into the new basis, `m ← P_newᵀ P_old m` (left side) or
       `m ← m P_old P_newᵀ` (right side); `v` is kept;
    2. the low-rank AdamW step of :func:`galore`: `W ← W − s_t α back(m / (√v + ε))`.

    The paper's pre-training runs keep the SVD for the first 80 % of the steps
    (`svd_steps=int(0.8 * total_steps)`); `svd_steps=0` (the default) is pure GoLore.
    The refresh runs where the gradient is (`refresh_shardings` does not divide it).

    Differences from the reference code: its optimizer form (`golore_torch/adamw.py`)
    computes the carried first moment but does not store it (the step after a refresh uses
    the old coordinates again); we carry it as its ReLoRA-style form (`merge_and_reinit`)
    does. Its random bases are drawn with torch's RNG; ours with JAX's (`seed`), from the
    same distribution.

    Args:
      learning_rate: a scalar or a schedule.
      rank: rank r of the projection (`k = min(r, m, n)` per matrix).
      update_proj_gap: T, steps between basis refreshes.
      svd_steps: the number of steps (per matrix) during which refreshes use the SVD.
      scale: α.
      proj_type: "std", "reverse_std", "left" or "right".
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to `√v` (HF-style).
      weight_decay: None or decoupled decay (as in :func:`galore`).
      mask: which leaves are decayed, as in `optax.adamw`: None (all), a pytree of bools
        like params (or a prefix of it; True: decayed) or a callable `params -> that
        pytree`. Idle matrices are not decayed either way.
      projected: which leaves are projected; see :class:`ProjectionSpec`.
      dimension_numbers: how a leaf is read as matrices; see :class:`ProjectionSpec`.
      refresh: the strategy after `svd_steps`: "random_orthonormal" (the paper's),
        "random" or a callable (see :func:`project`).
      refresh_schedule: "official" or "staggered" (see :func:`project`).
      mu_dtype: dtype of the first moment.
      seed: the seed of the random bases.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp, fira_optax as fo
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> tx = fo.golore(1e-2, rank=2, update_proj_gap=10, svd_steps=100)
      >>> updates, state = tx.update(params, tx.init(params), params)

    References:
      He et al., 2024. Subspace Optimization for Large Language Models with Convergence
      Guarantees. https://arxiv.org/abs/2410.11289
    """
    return _with_learning_rate(
        scale_by_golore(
            rank,
            update_proj_gap=update_proj_gap,
            svd_steps=svd_steps,
            scale=scale,
            proj_type=proj_type,
            b1=b1,
            b2=b2,
            eps=eps,
            projected=projected,
            dimension_numbers=dimension_numbers,
            refresh=refresh,
            refresh_schedule=refresh_schedule,
            mu_dtype=mu_dtype,
            seed=seed,
        ),
        learning_rate,
        weight_decay,
        ProjectionSpec(rank, proj_type, projected, dimension_numbers),
        mask,
    )


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: DecayMask = None,
    gamma: jax.typing.ArrayLike = 1.01,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "svd",
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""Fira: full-rank training with a low-rank optimizer state.

    The official `fira==1.0.2` `FiraAdamW`, as an optax optimizer over a whole param tree.
    For each projected matrix `W` (m×n, gradient `G`), with `k = min(r, m, n)` and steps
    `t = 1, 2, …`:

    1. every `T` steps (`t = 1, T+1, …`) refresh the orthonormal basis `P` from the float32 SVD
       of the current `G`: left `P = U_{:, :k}` (m×k), right `P = V^\top_{:k, :}` (k×n); the
       side follows `proj_type` ("std": right if m ≥ n else left);
    2. project: `R = P^\top G` (left) or `R = G P^\top` (right); the back-projection is
       `back(X) = P X` (left) or `X P` (right), scaled by α;
    3. Adam in the subspace (HF-style, ε outside the root, no bias correction here):

       .. math::
         m_t = β_1 m_{t-1} + (1-β_1) R,\quad v_t = β_2 v_{t-1} + (1-β_2) R^2,\quad
         N = \frac{m_t}{\sqrt{v_t} + ε}

    4. norm-based scaling of the residual, φ reduced over R's rank axis:

       .. math::
         φ = \frac{\lVert N \rVert}{\lVert R \rVert + 10^{-8}},\qquad
         S = φ \odot (G - α\,\mathrm{back}(R))

    5. norm-growth limiter (first step: remember `g = ‖S‖`):

       .. math::
         λ = \max\left(\frac{\lVert S \rVert}{g + 10^{-8}}, γ\right) / γ,\quad
         S ← S/λ,\quad g ← \lVert S \rVert

    6. update, with `s_t = lr_t \sqrt{1-β_2^t} / (1-β_1^t)`:

       .. math::
         W ← W - s_t\,(α\,\mathrm{back}(N) + S), \qquad W ← W - lr_t\, wd\, W

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
      weight_decay: None (no decay) or decoupled decay, applied after the step to the
        updated weights, times lr_t. An idle matrix (a projected matrix whose gradient is
        exactly zero) is not decayed, as PyTorch skips a parameter without a gradient.
      mask: which leaves are decayed, as in `optax.adamw`: None (all), a pytree of bools
        like params (or a prefix of it; True: decayed) or a callable `params -> that
        pytree`. Idle matrices are not decayed either way.
      gamma: γ ≥ 1, the limiter's allowed norm growth per step.
      projected: which leaves are projected; see :class:`ProjectionSpec` (default: the
        attention / MLP kernels — leaves with a matrix view that are not embeddings, heads,
        norms or biases, and whose low-rank state is smaller than AdamW's).
      dimension_numbers: how a leaf is read as (a stack of) matrices; see
        :class:`ProjectionSpec` (default: multi-head and conv kernels as one matrix, input
        axes × output axes; scanned layers and experts as stacks).
      refresh: "svd" (exact, the reference), "randomized" (subspace iteration), "random"
        (a Gaussian projection), "random_orthonormal" (a Haar-uniform orthonormal basis) or
        a callable (a strategy of your own); see :func:`project`.
      refresh_schedule: "official" (every `T` steps, all matrices together) or "staggered"
        (matrix `j` at its first step and whenever its step count `s_j mod T = o_j`, offsets
        balancing the refresh work over the window); see :func:`project`.
      refresh_shardings: None, or the params' shardings (a tree like params of
        `NamedSharding`s, as given to :func:`optimizer_state_shardings`): the refresh step
        then divides its SVDs / randomized refreshes over the devices, moving each gradient
        block once (all-to-all) and the bases back at rank size; same bases. See
        :func:`project`.
      mu_dtype: dtype of the first moment (default float32).
      base_optimizer: None (the official low-rank Adam) or any gradient-only optax
        transform to run inside the subspace, e.g. `optax.scale_by_factored_rms()` (see
        :func:`in_subspace`; `b1`, `b2`, `eps` and `mu_dtype` are then unused).
      seed: the seed of the random refresh strategies (see :func:`project`).

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
    return _with_learning_rate(
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
            dimension_numbers=dimension_numbers,
            refresh=refresh,
            refresh_schedule=refresh_schedule,
            refresh_shardings=refresh_shardings,
            mu_dtype=mu_dtype,
            base_optimizer=base_optimizer,
            seed=seed,
        ),
        learning_rate,
        weight_decay,
        ProjectionSpec(rank, proj_type, projected, dimension_numbers),
        mask,
    )
