"""FRUGAL: a state-full subspace (Adam on `R`) plus a state-free step on the rest of `G`.

`scale_by_frugal` and `frugal` are chains of the blocks: `project` →
`scale_by_low_rank_adam(bias_correction="torch", on_refresh="reset"|"keep")` →
`state_free_residual` → `project_back`, then the learning rate and PyTorch-style weight decay.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fira_optax._alias import (
    DecayMask,
    ScaleByLearningRateState,
    _active_matrices,
    _with_learning_rate,
    decayed_where,
)
from fira_optax._checks import concrete
from fira_optax._project import project
from fira_optax._project_back import project_back
from fira_optax._refresh import Refresh
from fira_optax._residual import STATE_FREE_RULES, state_free_residual
from fira_optax._spec import DimensionNumbersSpec, ProjectedSpec, ProjectionSpec
from fira_optax._subspace import scale_by_low_rank_adam
from fira_optax._types import ProjType, RefreshSchedule, StateFreeRule


def scale_by_frugal(
    rank: int,
    *,
    update_proj_gap: int = 200,
    state_free: StateFreeRule | None = "sign",
    state_free_learning_rate_ratio: jax.typing.ArrayLike = 1.0,
    reset_statistics: bool = True,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "svd",
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """FRUGAL's direction (no learning rate, no weight decay): see :func:`frugal`.

    Equal to the building-block chain
    `project → scale_by_low_rank_adam(bias_correction="torch", on_refresh="reset"|"keep") →
    state_free_residual → project_back` with one :class:`ProjectionSpec` shared by the
    stateful blocks (`state_free=None`: no `state_free_residual`).
    """
    if state_free is not None and state_free not in STATE_FREE_RULES:
        raise ValueError(
            f"Unknown state_free {state_free!r}; expected one of {STATE_FREE_RULES} or None "
            "(no state-free step)."
        )
    spec = ProjectionSpec(rank, proj_type, projected, dimension_numbers)
    residual = []
    if state_free is not None:
        residual.append(state_free_residual(state_free, state_free_learning_rate_ratio))
    return optax.chain(
        project(
            spec,
            update_proj_gap=update_proj_gap,
            refresh=refresh,
            refresh_schedule=refresh_schedule,
            refresh_shardings=refresh_shardings,
            seed=seed,
        ),
        scale_by_low_rank_adam(
            spec,
            b1,
            b2,
            eps,
            mu_dtype=mu_dtype,
            bias_correction="torch",
            on_refresh="reset" if reset_statistics else "keep",
        ),
        *residual,
        project_back(),
    )


def _decay_then_step(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: DecayMask = None,
) -> optax.GradientTransformation:
    """`W ← W − lr_t·wd·W − lr_t·u`: PyTorch AdamW's decoupled decay of the weights *before*
    the step (the official FRUGAL code's), where `fo.fira`'s decays the updated weights. The
    state is `fo.scale_by_learning_rate_and_decay`'s."""

    def init_fn(params):
        del params
        return ScaleByLearningRateState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, decays=None):
        if params is None:
            raise ValueError(
                f"frugal with weight_decay={weight_decay!r} needs the params: call "
                "tx.update(grads, state, params). (Under optax.inject_hyperparams a "
                "weight_decay you pass is a traced array even when it is 0: leave it at its "
                "default None, or list 'weight_decay' in static_args.)"
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        wd = weight_decay(state.count) if callable(weight_decay) else weight_decay
        wd = jnp.asarray(wd, jnp.float32)

        def step(u, p, keep):
            if keep is False:
                return (-lr * u.astype(jnp.float32)).astype(u.dtype)
            decay = lr * wd * p.astype(jnp.float32)
            if keep is not None:
                decay = jnp.where(keep, decay, 0.0)
            return (-lr * u.astype(jnp.float32) - decay).astype(u.dtype)

        leaves, treedef = jax.tree.flatten(updates)
        keeps = decayed_where(mask, params, treedef, decays)
        pairs = zip(leaves, treedef.flatten_up_to(params), keeps, strict=True)
        new = treedef.unflatten([step(u, p, keep) for u, p, keep in pairs])
        return new, ScaleByLearningRateState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    update_proj_gap: int = 200,
    state_free: StateFreeRule | None = "sign",
    state_free_learning_rate_ratio: jax.typing.ArrayLike = 1.0,
    reset_statistics: bool = True,
    proj_type: ProjType = "std",
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: DecayMask = None,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: Refresh = "svd",
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""FRUGAL: Adam in a low-rank subspace, a state-free step (signSGD or SGD) outside it.

    The official FRUGAL code's `GaloreAdamW` (SVD projection), as an optax optimizer over a
    whole param tree. For each projected matrix `W` (m×n, gradient `G`), with
    `k = min(r, m, n)` and steps `t = 1, 2, …`:

    1. every `T` steps (`t = 1, T+1, …`) refresh the orthonormal basis `P` from the float32
       SVD of `G` (as in :func:`fira`; `refresh=` chooses another strategy:
       "random_orthonormal" is the official `proj_type="random"`, a callable returning `k`
       rows (columns) of the identity its "randperm"); with `reset_statistics`
       the moments restart from zero and `τ`, the steps taken with the current basis, from 1
       (without it the moments are carried across refreshes and `τ = t`);
    2. project: `R = P^\top G` (left) or `R = G P^\top` (right); the back-projection is
       `back(X) = P X` (left) or `X P` (right), here with α = 1;
    3. Adam in the subspace, PyTorch-style (ε added to the bias-corrected root):

       .. math::
         m = β_1 m + (1-β_1) R,\quad v = β_2 v + (1-β_2) R^2,\quad
         N = \frac{m / (1-β_1^τ)}{\sqrt{v / (1-β_2^τ)} + ε}

    4. the state-free step on the residual `E = G − back(R)`, with
       `c = state_free_learning_rate_ratio`: `S = c·sign(E)` ("sign") or `S = c·E` ("sgd");
    5. update (weight decay of the weights before the step, as PyTorch's AdamW):

       .. math::
         W ← W - lr_t\, wd\, W - lr_t\,(\mathrm{back}(N) + S)

    Leaves that are not projected get the same AdamW step with `R = G` (no refresh, no
    reset, `τ = t`). The optimizer state is GaLore's: basis and two moments per matrix; the
    state-free step stores nothing. The sign rule costs one more `m×k×n` matmul per matrix
    and step than GaLore (see :func:`state_free_residual`).

    Differences from the official code: the bases are sign-canonical (as in :func:`fira`;
    without `reset_statistics` the carried moments depend on the sign); the rank is given as
    `rank` (official: `density`, the rank is `round(density·n)` for a right projection,
    `round(density·m)` for a left one); `proj_params_lr_scale` (1.0 in the paper's
    experiments) is not an argument: give the projected leaves their own learning rate with
    `optax.multi_transform`; when the subspace is the whole projected side (`k = n` right,
    `k = m` left) the residual is zero and so is the sign step (the official code takes the
    sign of its round-off: a full step on every entry); an idle matrix (its gradient exactly
    zero) takes no step, as a parameter whose `grad` is None. The official "frugal"
    pre-training runs select whole matrices (`BlockAdamW`: the state-full part is a subset of
    the layers, refreshed every `T` steps); that is not this optimizer.

    Args:
      learning_rate: a scalar or a schedule.
      rank: rank r of the state-full subspace (`k = min(r, m, n)` per matrix).
      update_proj_gap: T, steps between basis refreshes.
      state_free: "sign" (signSGD, FRUGAL's default), "sgd", or None (no state-free step:
        GaLore's update, with FRUGAL's reset and Adam).
      state_free_learning_rate_ratio: `c ≥ 0`, the state-free learning rate relative to
        `learning_rate` (the official `inactive_lr_scale`: 1 for pre-training, 0.1 for
        fine-tuning in the paper).
      reset_statistics: restart a matrix's moments and bias correction at each refresh (the
        official default); False carries them across refreshes.
      proj_type: "std", "reverse_std", "left" or "right" (the official `proj_side`).
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the bias-corrected `√v̂` (PyTorch-style).
      weight_decay: None (no decay) or decoupled decay of the weights before the step, times
        lr_t (PyTorch's AdamW). An idle matrix is not decayed.
      mask: which leaves are decayed, as in `optax.adamw`: None (all), a pytree of bools
        like params (or a prefix of it; True: decayed) or a callable `params -> that
        pytree`. Idle matrices are not decayed either way.
      projected: which leaves are projected; see :class:`ProjectionSpec` (default: the
        attention / MLP kernels).
      dimension_numbers: how a leaf is read as (a stack of) matrices; see
        :class:`ProjectionSpec`.
      refresh: "svd" (the official default), "randomized", "random", "random_orthonormal" or
        a callable; see :func:`project`.
      refresh_schedule: "official" or "staggered"; see :func:`project`.
      refresh_shardings: None, or the params' shardings (the divided refresh); see
        :func:`project`.
      mu_dtype: dtype of the first moment (default float32).
      seed: the seed of the random refresh strategies (see :func:`project`).

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fira_optax as fo
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> tx = fo.frugal(1e-3, rank=2, update_proj_gap=10, projected={"w": True, "b": False})
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Zmushko et al., 2024. FRUGAL: Memory-Efficient Optimization by Reducing State Overhead
      for Scalable Training. https://arxiv.org/abs/2411.07837
    """
    direction = scale_by_frugal(
        rank,
        update_proj_gap=update_proj_gap,
        state_free=state_free,
        state_free_learning_rate_ratio=state_free_learning_rate_ratio,
        reset_statistics=reset_statistics,
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
        seed=seed,
    )
    spec = ProjectionSpec(rank, proj_type, projected, dimension_numbers)
    no_decay = weight_decay is None or (
        not callable(weight_decay)
        and (known := concrete(weight_decay)) is not None
        and not known.any()
    )
    if no_decay:
        return _with_learning_rate(direction, learning_rate, None, spec)
    lr = _decay_then_step(learning_rate, weight_decay, mask)
    direction = optax.with_extra_args_support(direction)

    def init_fn(params):
        return direction.init(params), lr.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        decays = _active_matrices(updates, spec)  # idle matrices are not decayed
        updates, direction_state = direction.update(updates, state[0], params, **extra_args)
        updates, lr_state = lr.update(updates, state[1], params, decays=decays)
        return updates, (direction_state, lr_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
