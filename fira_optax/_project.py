"""`project`: the basis refresh and the projection of every selected matrix.

When each matrix refreshes is `_schedule`'s (official or staggered), how is `_refresh`'s
(exact SVD or randomized), where is `_distributed`'s (with the params' layouts, each device
refreshes its share of the matrices).

Projected leaves leave this transform as :class:`fira_optax.LowRankUpdate` nodes carrying the
basis, the gradient (in the leaf's matrix view `(*batch, m, n)`) and the low-rank gradient `R`;
:func:`fira_optax.project_back` turns them back into dense updates.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from fira_optax import _schedule
from fira_optax._checks import MAX_GAP, as_int, check_real
from fira_optax._distributed import RefreshLeaf, divided_refresh, layout, mesh_and_specs
from fira_optax._node import LowRankUpdate
from fira_optax._refresh import DATA_FREE, RefreshFn, check_refresh, refresh_basis
from fira_optax._shapes import active as matrices_active
from fira_optax._shapes import project_matrix
from fira_optax._spec import DimensionNumbersSpec, ProjectedSpec, ProjectionSpec, make_spec


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


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """A per-leaf key from its key path (stable under `optax.masked` / `multi_transform`)."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def project(
    rank: int | ProjectionSpec | None = None,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    *,
    projected: ProjectedSpec = None,
    dimension_numbers: DimensionNumbersSpec = None,
    refresh: str | RefreshFn = "svd",
    refresh_schedule: str = "official",
    refresh_shardings: Any = None,
    spec: ProjectionSpec | None = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""Projects the gradient of each selected matrix onto a rank-`rank` subspace.

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
    unchanged. Without it (or on one device) every device refreshes every matrix, as before.

    Args:
      rank: target rank r (each matrix uses `k = min(r, m, n)`), or a
        :class:`fira_optax.ProjectionSpec`.
      update_proj_gap: T, steps between basis refreshes.
      scale: α > 0, the scale of the projected-back update.
      proj_type: "std", "reverse_std", "left" or "right" (the side rule).
      projected: which leaves are projected (see :class:`fira_optax.ProjectionSpec`).
      dimension_numbers: how a leaf is read as matrices (see
        :class:`fira_optax.ProjectionSpec`).
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
      spec: the shared :class:`fira_optax.ProjectionSpec` (instead of rank/proj_type/
        projected/dimension_numbers).
      seed: the seed of the random strategies ("randomized", "random",
        "random_orthonormal", a callable's `key`): each refresh of each matrix draws from a
        key derived from it, the step count and the leaf's key path.

    Returns:
      An `optax.GradientTransformation`.
    """
    spec = make_spec("project", spec, rank, proj_type, projected, dimension_numbers)
    update_proj_gap = as_int("update_proj_gap", update_proj_gap, high=MAX_GAP)
    check_scale(scale)
    check_refresh(refresh)
    if not isinstance(seed, jax.core.Tracer):  # inject_hyperparams may trace it: fine
        seed = as_int("seed", seed, low=0, high=2**31 - 1)
    _schedule.check_schedule(refresh_schedule)
    divisible = not callable(refresh) and refresh not in DATA_FREE
    orthonormal = not callable(refresh) and refresh != "random"
    if refresh_shardings is None or not divisible:
        # A random strategy reads no gradient (no gradient moves; under jit each device draws
        # what its sharded state holds); a callable runs where the gradient is.
        mesh, spec_of = None, {}
    else:
        mesh, spec_of = mesh_and_specs(refresh_shardings)
    if mesh is not None and mesh.size == 1:
        mesh = None

    def _spec_of(path: str) -> PartitionSpec:
        if path not in spec_of:
            known = ", ".join(sorted(spec_of)[:6])
            raise ValueError(
                f"project: refresh_shardings has no sharding for the projected leaf {path!r} "
                f"(it has {known}, ...): pass the params' shardings, a tree like params."
            )
        return spec_of[path]

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
        bases = treedef.flatten_up_to(state.bases)
        all_steps = treedef.flatten_up_to(state.steps)
        alpha = jnp.asarray(scale, jnp.float32)
        if refresh_schedule == "staggered":
            offsets = _schedule.offsets(plans, update_proj_gap, refresh)
        else:
            offsets = [None] * len(plans)

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

        old_bases = bases
        if mesh is not None:  # one divided refresh of every projected matrix
            bases = _divided(grads, plans, bases, all_steps, offsets, key)

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
            if mesh is None:
                due = _schedule.due(steps, update_proj_gap, offset)  # per matrix

                def new_basis(grad_mxn=grad_mxn, basis=basis, plan=plan, due=due, steps=steps):
                    key_leaf = leaf_key(key, plan.path)
                    return refresh_basis(
                        grad_mxn,
                        basis,
                        plan.k,
                        plan.side,
                        key_leaf,
                        refresh,
                        due,
                        path=plan.path,
                        steps=steps,
                    )

                basis = jax.lax.cond(jnp.any(due), new_basis, lambda basis=basis: basis)
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
                    residual_scale=None,
                    scale=alpha,
                    step_scale=jnp.ones([], jnp.float32),
                    step=steps,
                    active=active,
                    plan=plan,
                    orthonormal=orthonormal,
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

    def _divided(grads, plans, bases, all_steps, offsets, key):
        """The bases after the divided refresh (a list like `bases`)."""
        picked = [i for i, plan in enumerate(plans) if plan is not None]
        if not picked:
            return bases
        mesh_shape = dict(mesh.shape)
        leaves = []
        for i in picked:
            plan = plans[i]
            size = math.prod(plan.batch_shape)
            key_leaf = leaf_key(key, plan.path)
            keys = jax.random.split(key_leaf, size) if plan.batch_shape else key_leaf[None]
            due = _schedule.due(all_steps[i], update_proj_gap, offsets[i])
            leaves.append(
                RefreshLeaf(
                    grad=grads[i],
                    basis=bases[i],
                    plan=plan,
                    layout=layout(plan, _spec_of(plan.path), mesh_shape),
                    keys=jax.random.key_data(keys),
                    due=due.reshape(size),
                )
            )
        new = divided_refresh(leaves, [offsets[i] for i in picked], mesh, refresh)
        out = list(bases)
        for i, basis in zip(picked, new, strict=True):
            out[i] = basis
        return out

    return optax.GradientTransformation(init_fn, update_fn)
