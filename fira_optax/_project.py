"""`project`: the basis refresh and the projection of every selected matrix.

Projected leaves leave this transform as :class:`fira_optax.LowRankUpdate` nodes carrying the
basis, the gradient (in the leaf's matrix view `(*batch, m, n)`) and the low-rank gradient `R`;
:func:`fira_optax.project_back` turns them back into dense updates.
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_optax._checks import MAX_GAP, as_int, check_real
from fira_optax._node import LowRankUpdate
from fira_optax._refresh import REFRESH_METHODS, refresh_basis
from fira_optax._shapes import project_matrix
from fira_optax._spec import DimensionNumbersSpec, ProjectedSpec, ProjectionSpec, make_spec


class ProjectState(NamedTuple):
    """State of :func:`project`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32`. A refresh happens when
        `count % update_proj_gap == 0`.
      bases: a tree like params; a projected leaf holds its basis `P` (float32, in its matrix
        view: `(..., m, k)` left or `(..., k, n)` right); every other leaf holds None.
    """

    count: jax.Array
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
    refresh: str = "svd",
    spec: ProjectionSpec | None = None,
) -> optax.GradientTransformation:
    """Projects the gradient of each selected matrix onto a rank-`rank` subspace.

    Every `update_proj_gap` steps (at steps 1, T+1, 2T+1, ...) the basis is recomputed from the
    current gradient and used in the same step. Projected leaves leave this transform as
    :class:`LowRankUpdate` nodes, every other leaf passes through unchanged. Must be followed
    (eventually) by :func:`fira_optax.project_back`. See :func:`fira_optax.fira` for the maths.

    Args:
      rank: target rank r (each matrix uses `k = min(r, m, n)`), or a
        :class:`fira_optax.ProjectionSpec`.
      update_proj_gap: T, steps between basis refreshes.
      scale: α > 0, the scale of the projected-back update.
      proj_type: "std", "reverse_std", "left" or "right" (the side rule).
      projected: which leaves are projected (see :class:`fira_optax.ProjectionSpec`).
      dimension_numbers: how a leaf is read as matrices (see
        :class:`fira_optax.ProjectionSpec`).
      refresh: "svd" (exact, float32, sign-canonical) or "randomized" (subspace iteration
        warm-started from the previous basis; matmuls + thin QR).
      spec: the shared :class:`fira_optax.ProjectionSpec` (instead of rank/proj_type/
        projected/dimension_numbers).

    Returns:
      An `optax.GradientTransformation`.
    """
    spec = make_spec("project", spec, rank, proj_type, projected, dimension_numbers)
    update_proj_gap = as_int("update_proj_gap", update_proj_gap, high=MAX_GAP)
    check_scale(scale)
    if refresh not in REFRESH_METHODS:
        raise ValueError(f"Unknown refresh {refresh!r}; expected one of {REFRESH_METHODS}.")

    def init_fn(params):
        bases = [
            None if plan is None else jnp.zeros(plan.basis_shape, jnp.float32)
            for plan in spec.flat_plans(params)
        ]
        bases = jax.tree.structure(params).unflatten(bases)
        return ProjectState(count=jnp.zeros([], jnp.int32), bases=bases)

    def update_fn(updates, state, params=None):
        del params
        do_refresh = state.count % update_proj_gap == 0
        key = jax.random.fold_in(jax.random.key(0), state.count)
        grads, treedef = jax.tree.flatten(updates)
        plans = spec.flat_plans(updates)
        bases = treedef.flatten_up_to(state.bases)
        alpha = jnp.asarray(scale, jnp.float32)

        new_updates, new_bases = [], []
        for grad, plan, basis in zip(grads, plans, bases, strict=True):
            if plan is None and basis is None:
                new_updates.append(grad)
                new_bases.append(None)
                continue
            if plan is None or basis is None or basis.shape != plan.basis_shape:
                name = plan.path if plan is not None else "?"
                have = None if basis is None else basis.shape
                raise ValueError(
                    f"project: leaf {name!r} of shape {grad.shape} needs a basis of shape "
                    f"{None if plan is None else plan.basis_shape}, but the state holds "
                    f"{have}: the state was initialised for different params (or a different "
                    "spec)."
                )
            grad_mxn = plan.view.to_matrix(grad)

            def new_basis(grad_mxn=grad_mxn, basis=basis, plan=plan):
                key_leaf = leaf_key(key, plan.path)
                return refresh_basis(grad_mxn, basis, plan.k, plan.side, key_leaf, refresh)

            basis = jax.lax.cond(do_refresh, new_basis, lambda basis=basis: basis)
            low_rank = project_matrix(grad_mxn, basis, plan.side)
            new_updates.append(
                LowRankUpdate(
                    basis=basis,
                    grad=grad_mxn,
                    low_rank=low_rank,
                    direction=low_rank,
                    residual_scale=None,
                    scale=alpha,
                    step_scale=jnp.ones([], jnp.float32),
                    plan=plan,
                )
            )
            new_bases.append(basis)

        return (
            treedef.unflatten(new_updates),
            ProjectState(
                count=optax.safe_increment(state.count), bases=treedef.unflatten(new_bases)
            ),
        )

    return optax.GradientTransformation(init_fn, update_fn)
