"""`project`: the basis refresh and the projection of every selected matrix.

When each matrix refreshes is `_schedule`'s (official or staggered), how is `_refresh`'s (a
strategy: one function per kind), where is the refresher's (`_refresh.Refresher`, picked when
`project` is constructed: `_refresh.LocalRefresh`, or `_distributed.DividedRefresh` when the
params' layouts are given and each device refreshes its share of the matrices).

Projected leaves leave this transform as :class:`fira_optax.LowRankUpdate` nodes carrying the
basis, the gradient (in the leaf's matrix view `(*batch, m, n)`) and the low-rank gradient `R`;
:func:`fira_optax.project_back` turns them back into dense updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_optax import _schedule
from fira_optax._checks import MAX_GAP, as_int, check_real
from fira_optax._distributed import refresher as make_refresher
from fira_optax._node import LowRankUpdate
from fira_optax._refresh import Refresh, RefreshLeaf, check_refresh, matrix_keys, orthonormal
from fira_optax._shapes import active as matrices_active
from fira_optax._shapes import project_matrix
from fira_optax._spec import ProjectionSpec, check_spec
from fira_optax._types import RefreshSchedule


class ProjectState(NamedTuple):
    """State of :func:`project`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32` (seeds the randomized
        refresh).
      steps: a tree like params; a projected leaf holds, per matrix, the number of steps it
        took (int32, shape `(...)` of its stack axes): a matrix whose gradient is exactly
        zero is idle and does not count. A matrix is refreshed when
        `steps % update_proj_gap == 0`; None for the other leaves.
      bases: a tree like params; a projected leaf holds its basis `P` (float32, in its matrix
        view: `(..., m, k)` left or `(..., k, n)` right); every other leaf holds None.

    The state is the same for every `refresh_schedule` and `refresh_shardings` (the staggered
    offsets are static, derived from the tree).
    """

    count: jax.Array
    steps: Any
    bases: Any


def check_scale(scale: Any) -> None:
    check_real("scale", scale, low=0.0, low_open=True, what="a finite number > 0 (α)")


def project(
    spec: ProjectionSpec,
    *,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    refresh: Refresh = "svd",
    refresh_schedule: RefreshSchedule = "official",
    refresh_shardings: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""Projects the gradient of each selected matrix onto a rank-`spec.rank` subspace.

    Every `update_proj_gap` steps (at steps 1, T+1, 2T+1, ...) the basis is recomputed from the
    current gradient and used in the same step. Projected leaves leave this transform as
    :class:`LowRankUpdate` nodes, every other leaf passes through unchanged. Must be followed
    (eventually) by :func:`fira_optax.project_back`. See :func:`fira_optax.fira` for the maths.

    Steps are counted per matrix, as PyTorch counts them per parameter: a matrix whose
    gradient is exactly zero (an expert that received no tokens, a layer frozen by zeroing its
    gradient) is *idle* — like a parameter whose `grad` is None it takes no step, keeps its
    basis and its refresh schedule, and gets its first basis at its first non-zero gradient.
    Only the whole gradient decides: a non-zero gradient orthogonal to the current basis
    (`R = 0`, common with sparse gradients — one-hot or embedding-like inputs, small batches,
    MoE routing) is a step like any other, as in the official code: its moments decay, Fira
    trains it through the residual, and its step count and refresh schedule advance. On
    non-degenerate input every matrix steps every time and this is the official schedule.

    **Staggered refresh** (`refresh_schedule="staggered"`, opt-in). With the official schedule
    every matrix refreshes on the same step, which then carries every SVD of the model (at
    LLaMA-60M ~40 normal steps). Staggered, matrix `j`, with its own step count `s_j` (the
    steps it took before this one), refreshes when

    .. math::
      s_j = 0 \quad\text{or}\quad s_j \bmod T = o_j, \qquad o_j \in \{0, …, T-1\},

    i.e. at its first step (it cannot train without a basis), then once in every window of `T`
    steps at its own offset `o_j`, so its basis is never older than `T` steps. The offsets are
    deterministic, from the projected matrices' shapes and key paths: largest refresh cost
    first, each on the phase with the least summed cost (cost `m·n·min(m, n)` for the SVD,
    `m·n·(k+8)` randomized), evenly spread when there are at most `T` matrices — every step
    carries about `1/T` of the refresh work. The state and the first step are the official
    ones; later bases are refreshed at other steps, so the trajectory differs slightly.

    **Divided refresh on a mesh** (`refresh_shardings=`, opt-in). Given the params' shardings
    (the tree of `NamedSharding`s also given to :func:`fira_optax.optimizer_state_shardings`),
    the refresh step divides its work over the devices: matrices of equal shape are grouped
    across leaves and layers, every device sends each gradient block it holds once, to the
    device that refreshes that matrix (one all-to-all: no m×n gradient is all-gathered), each
    device refreshes its share with the single-device code and random keys (so the bases equal
    the single-device ones to float32 round-off, sign rule included), and a second all-to-all
    returns each device the rows of the new bases its state holds. Non-refresh steps are
    unchanged. Without it (or on one device, or with a strategy that reads no gradient or a
    callable) every device refreshes every matrix where it is.

    Args:
      spec: the :class:`fira_optax.ProjectionSpec` (rank, side rule, which leaves, as which
        matrices), shared with the chain's other stateful blocks.
      update_proj_gap: T, steps between basis refreshes.
      scale: α > 0, the scale of the projected-back update.
      refresh: how a basis is refreshed: "svd" (exact, float32, sign-canonical),
        "randomized" (subspace iteration warm-started from the previous basis; matmuls +
        thin QR), "random" (a Gaussian projection with entries `N(0, 1/k)`, drawn anew at
        every refresh, independent of the gradient: APOLLO's), "random_orthonormal" (a
        Haar-uniform orthonormal basis: GoLore's), or a callable
        `fn(grad_mxn, basis, key, *, k, side, path, step) -> new basis` called per matrix
        (float32 gradient `(m, n)`, the old basis, zeros before the first refresh; the leaf's
        key path; the matrix's step count before this step) returning the basis in the
        old one's shape.
      refresh_schedule: "official" (every matrix when its step count is a multiple of `T`)
        or "staggered" (each matrix at its own offset in the window; see above).
      refresh_shardings: None, or the params' shardings — a tree like params of
        `jax.sharding.NamedSharding` (None leaves: replicated), matched to the leaves by key
        path (so the whole tree also serves a transform inside `optax.multi_transform`): the
        refresh is then divided over their mesh (see above).
      seed: the seed of the random strategies ("randomized", "random",
        "random_orthonormal", a callable's `key`): each refresh of each matrix draws from a
        key derived from it, the step count and the leaf's key path.

    Returns:
      An `optax.GradientTransformation`.

    Raises:
      TypeError: when `spec` is not a :class:`fira_optax.ProjectionSpec` (an int names
        `fo.ProjectionSpec(rank=...)`).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import fira_optax as fo
      >>> spec = fo.ProjectionSpec(rank=2)
      >>> tx = optax.chain(
      ...     fo.project(spec, update_proj_gap=10),
      ...     fo.scale_by_low_rank_adam(spec=spec),
      ...     fo.project_back(),
      ... )
      >>> params = {"w": jnp.ones((4, 3))}
      >>> updates, state = tx.update(params, tx.init(params))
      >>> updates["w"].shape
      (4, 3)
    """
    spec = check_spec("project", spec)
    update_proj_gap = as_int("update_proj_gap", update_proj_gap, high=MAX_GAP)
    check_scale(scale)
    check_refresh(refresh)
    if not isinstance(seed, jax.core.Tracer):  # inject_hyperparams may trace it: fine
        seed = as_int("seed", seed, low=0, high=2**31 - 1)
    _schedule.check_schedule(refresh_schedule)
    refresher = make_refresher(refresh, refresh_shardings)  # local, or divided over the mesh
    is_orthonormal = orthonormal(refresh)

    def init_fn(params):
        bases = [
            None if plan is None else jnp.zeros(plan.basis_shape, jnp.float32)
            for plan in spec.flat_plans(params)
        ]
        steps = [
            None if plan is None else jnp.zeros(plan.batch_shape, jnp.int32)
            for plan in spec.flat_plans(params)
        ]
        treedef = jax.tree.structure(params)
        return ProjectState(
            count=jnp.zeros([], jnp.int32),
            steps=treedef.unflatten(steps),
            bases=treedef.unflatten(bases),
        )

    def update_fn(updates, state, params=None):
        del params
        key = jax.random.fold_in(jax.random.key(seed), state.count)
        grads, treedef = jax.tree.flatten(updates)
        plans = spec.flat_plans(updates)
        old_bases = treedef.flatten_up_to(state.bases)
        all_steps = treedef.flatten_up_to(state.steps)
        _check_bases(grads, plans, old_bases)
        if refresh_schedule == "staggered":
            offsets = _schedule.offsets(plans, update_proj_gap, refresh)
        else:
            offsets = [None] * len(plans)

        picked = [i for i, plan in enumerate(plans) if plan is not None]
        leaves = [
            RefreshLeaf(
                grad=grads[i],
                basis=old_bases[i],
                plan=plans[i],
                steps=all_steps[i],
                due=_schedule.due(all_steps[i], update_proj_gap, offsets[i]),
                offset=offsets[i],
                keys=matrix_keys(key, plans[i].batch_shape, plans[i].path),
            )
            for i in picked
        ]
        bases = list(old_bases)
        for i, basis in zip(picked, refresher(leaves), strict=True):
            bases[i] = basis

        alpha = jnp.asarray(scale, jnp.float32)
        new_updates, new_bases, new_steps = [], [], []
        for grad, plan, basis, old_basis, steps, offset in zip(
            grads, plans, bases, old_bases, all_steps, offsets, strict=True
        ):
            if plan is None:
                new_updates.append(grad)
                new_bases.append(None)
                new_steps.append(None)
                continue
            grad_mxn = plan.view.to_matrix(grad)
            low_rank = project_matrix(grad_mxn, basis, plan.side)
            # Per matrix; idle only when the whole gradient is exactly zero. A non-zero
            # gradient orthogonal to the basis (R = 0) is a step like any other: the moments
            # decay, Fira trains it through the residual, the schedule advances.
            active = matrices_active(grad_mxn)
            age = _schedule.basis_age(steps, update_proj_gap, offset)
            steps = steps + active.astype(jnp.int32)
            new_updates.append(
                LowRankUpdate(
                    basis=basis,
                    previous_basis=old_basis,
                    grad=grad_mxn,
                    low_rank=low_rank,
                    direction=low_rank,
                    phi=None,
                    alpha=alpha,
                    bias_correction=jnp.ones([], jnp.float32),
                    step=steps,
                    active=active,
                    plan=plan,
                    orthonormal=is_orthonormal,
                    basis_age=age,
                )
            )
            new_bases.append(basis)
            new_steps.append(steps)

        return (
            treedef.unflatten(new_updates),
            ProjectState(
                count=optax.safe_increment(state.count),
                steps=treedef.unflatten(new_steps),
                bases=treedef.unflatten(new_bases),
            ),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _check_bases(grads, plans, bases) -> None:
    """Raises naming the leaf when the state's bases do not fit the leaves' plans."""
    for grad, plan, basis in zip(grads, plans, bases, strict=True):
        if (plan is None) != (basis is None) or (
            plan is not None and basis.shape != plan.basis_shape
        ):
            name = plan.path if plan is not None else "?"
            have = None if basis is None else basis.shape
            raise ValueError(
                f"project: leaf {name!r} of shape {grad.shape} needs a basis of shape "
                f"{None if plan is None else plan.basis_shape}, but the state holds "
                f"{have}: the state was initialised for different params (or a different "
                "spec)."
            )
