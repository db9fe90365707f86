"""Low-rank projection: the side rule, the basis refresh and the `project` transform.

Shapes follow the convention of DESIGN.md: a projected leaf is a matrix `grad_mxn` (or a stack
`grad_...xmxn` over leading batch axes, projected matrix by matrix). With `k = min(rank, m, n)`:

- left side:  `basis_mxk = U[:, :k]`,  `low_rank_kxn = basis_mxkᵀ @ grad_mxn`
- right side: `basis_kxn = Vh[:k, :]`, `low_rank_mxk = grad_mxn @ basis_kxnᵀ`

`project` turns every projected leaf of the update tree into a :class:`LowRankUpdate` node that
carries the basis, the full gradient and the low-rank gradient down an `optax.chain`;
`project_back` (in `_project_back.py`) turns the node back into a dense update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_optax import _masks
from fira_optax._refresh import REFRESH_METHODS, randomized_basis, svd_basis

PROJ_TYPES = ("std", "reverse_std", "left", "right")
LEFT, RIGHT = "left", "right"


# ----------------------------------------------------------------------------------------------
# The side rule.


def check_proj_type(proj_type: str) -> None:
    if proj_type == "full":
        raise ValueError(
            "proj_type='full' (two-sided projection) is not supported: the official Fira code "
            "crashes on it and the residual it leaves is not defined by the paper. Use one of "
            f"{PROJ_TYPES}."
        )
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"Unknown proj_type {proj_type!r}; expected one of {PROJ_TYPES}.")


def side_for_shape(shape: tuple[int, ...], proj_type: str) -> str:
    """Which side a matrix of `shape` (last two axes m, n) is projected on.

    | proj_type   | m ≥ n | m < n |
    | std         | right | left  |
    | reverse_std | left  | right |
    | left/right  | left/right    |
    """
    check_proj_type(proj_type)
    m, n = shape[-2:]
    if proj_type in (LEFT, RIGHT):
        return proj_type
    tall = m >= n
    if proj_type == "std":
        return RIGHT if tall else LEFT
    return LEFT if tall else RIGHT


def effective_rank(shape: tuple[int, ...], rank: int) -> int:
    """`k = min(rank, m, n)`: a rank at or above the smaller dimension is truncated."""
    return min(rank, *shape[-2:])


def basis_shape(shape: tuple[int, ...], rank: int, side: str) -> tuple[int, ...]:
    *batch, m, n = shape
    k = effective_rank(shape, rank)
    return (*batch, m, k) if side == LEFT else (*batch, k, n)


def low_rank_shape(shape: tuple[int, ...], rank: int, side: str) -> tuple[int, ...]:
    *batch, m, n = shape
    k = effective_rank(shape, rank)
    return (*batch, k, n) if side == LEFT else (*batch, m, k)


def project_matrix(grad_mxn: jax.Array, basis: jax.Array, side: str) -> jax.Array:
    """The low-rank gradient `R`: `Pᵀ G` (left, k×n) or `G Pᵀ` (right, m×k), in float32.

    Written as plain matmuls with the (small) basis transposed, not as einsums contracting a
    leading axis: XLA:CPU lowers the latter to a slower generic dot (measured 1.6× on
    512×1376, rank 128; `benchmarks/RESULTS.md`).
    """
    basis_t = jnp.swapaxes(basis.astype(grad_mxn.dtype), -1, -2)
    if side == LEFT:
        return jnp.matmul(basis_t, grad_mxn, preferred_element_type=jnp.float32)
    return jnp.matmul(grad_mxn, basis_t, preferred_element_type=jnp.float32)


def back_matrix(low_rank: jax.Array, basis: jax.Array, side: str) -> jax.Array:
    """`P X` (left) or `X P` (right), without the scale α."""
    if side == LEFT:
        return jnp.matmul(basis, low_rank)
    return jnp.matmul(low_rank, basis)


def rank_axis(side: str) -> int:
    """The axis of the low-rank gradient that indexes the basis vectors (the k axis)."""
    return -2 if side == LEFT else -1


# ----------------------------------------------------------------------------------------------
# The structured update that travels between `project` and `project_back`.


@dataclasses.dataclass(frozen=True)
class LowRankUpdate:
    """A projected leaf of the update tree, between `project` and `project_back`.

    Plain optax transforms never see it: `project_back` turns it into a dense update. The
    residual `S = φ ⊙ (G − α·back(R))` is kept *implicit* (as its per-row/column scale φ) so
    that `project_back` can build `α·back(N) + S` with one matmul and one elementwise pass.

    Attributes:
      basis: `P`, float32, `(..., m, k)` (left) or `(..., k, n)` (right).
      grad: the full gradient `G`, `(..., m, n)`, in the param's dtype.
      low_rank: `R`, the projected gradient, float32, `(..., k, n)` or `(..., m, k)`.
      direction: the low-rank direction `N` (`R` until a subspace optimizer sets it).
      residual_scale: `φ` broadcastable against `G` (`(..., 1, n)` left, `(..., m, 1)` right),
        or None when the residual is dropped (GaLore).
      scale: α, the scale of `back()`.
      step_scale: a scalar multiplying the whole dense update (Adam's bias correction).
      side: "left" or "right" (static).
    """

    basis: jax.Array
    grad: jax.Array
    low_rank: jax.Array
    direction: jax.Array
    residual_scale: jax.Array | None
    scale: jax.Array
    step_scale: jax.Array
    side: str = dataclasses.field(metadata={"static": True})

    def replace(self, **kwargs: Any) -> LowRankUpdate:
        return dataclasses.replace(self, **kwargs)


jax.tree_util.register_dataclass(
    LowRankUpdate,
    data_fields=[
        "basis",
        "grad",
        "low_rank",
        "direction",
        "residual_scale",
        "scale",
        "step_scale",
    ],
    meta_fields=["side"],
)


def is_low_rank(x: Any) -> bool:
    return isinstance(x, LowRankUpdate)


def map_nodes(fn: Callable[..., Any], updates: Any, *rest: Any) -> Any:
    """Maps `fn(node, *state_leaves)` over projected leaves; dense leaves pass through."""

    def apply(u, *r):
        return fn(u, *r) if is_low_rank(u) else u

    return jax.tree.map(apply, updates, *rest, is_leaf=is_low_rank)


# ----------------------------------------------------------------------------------------------
# The `project` transform.


def refresh_basis(
    grad: jax.Array, basis: jax.Array, k: int, side: str, key: jax.Array, refresh: str
) -> jax.Array:
    """A new basis for a (stack of) matrices; a matrix whose refresh fails keeps its basis.

    Stacked leaves `(..., m, n)` are refreshed one matrix at a time (`lax.map`): XLA:CPU's
    batched LAPACK kernels split a batch over the intra-op thread pool and block on it, which
    can deadlock when several host devices run at once; one matrix per call avoids that and
    costs nothing on CPU (each SVD is already sequential LAPACK work).
    """

    def one(grad_mxn, basis_old, key_one):
        if refresh == "svd":
            candidate = svd_basis(grad_mxn, k, side)
        else:
            candidate = randomized_basis(grad_mxn, basis_old, k, side, key_one)
        # A refresh that fails (non-finite gradient, SVD that did not converge) keeps the
        # previous basis instead of poisoning every later step.
        return jnp.where(jnp.all(jnp.isfinite(candidate)), candidate, basis_old)

    batch = grad.shape[:-2]
    if not batch:
        return one(grad, basis, key)
    size = math.prod(batch)
    keys = jax.random.split(key, size)
    flat = jax.lax.map(
        lambda args: one(*args),
        (grad.reshape(size, *grad.shape[-2:]), basis.reshape(size, *basis.shape[-2:]), keys),
    )
    return flat.reshape(basis.shape)


class ProjectState(NamedTuple):
    """State of :func:`project`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32`. A refresh happens when
        `count % update_proj_gap == 0`.
      bases: a tree like params; a projected leaf holds its basis `P` (float32,
        `(..., m, k)` left or `(..., k, n)` right); every other leaf holds None.
    """

    count: jax.Array
    bases: Any


def project(
    rank: int,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    *,
    projected: _masks.ProjectedSpec = None,
    refresh: str = "svd",
) -> optax.GradientTransformation:
    """Projects the gradient of each selected matrix onto a rank-`rank` subspace.

    Every `update_proj_gap` steps (at steps 1, T+1, 2T+1, ...) the basis is recomputed from the
    current gradient and used in the same step. Projected leaves leave this transform as
    :class:`LowRankUpdate` nodes, every other leaf passes through unchanged. Must be followed
    (eventually) by :func:`fira_optax.project_back`. See :func:`fira_optax.fira` for the maths.

    Args:
      rank: target rank r; each matrix uses `k = min(r, m, n)`.
      update_proj_gap: T, steps between basis refreshes.
      scale: α, the scale of the projected-back update.
      proj_type: "std", "reverse_std", "left" or "right" (the side rule).
      projected: which leaves are projected (see :func:`fira_optax.projected_mask`).
      refresh: "svd" (exact, float32, sign-canonical) or "randomized" (subspace iteration
        warm-started from the previous basis; matmuls + thin QR).

    Returns:
      An `optax.GradientTransformation`.
    """
    check_hyperparams(rank=rank, update_proj_gap=update_proj_gap, proj_type=proj_type)
    if refresh not in REFRESH_METHODS:
        raise ValueError(f"Unknown refresh {refresh!r}; expected one of {REFRESH_METHODS}.")

    def init_fn(params):
        mask = _masks.projected_mask(params, projected)

        def init_leaf(path, p, is_projected):
            if not is_projected:
                return None
            side = side_for_shape(p.shape, proj_type)
            return jnp.zeros(basis_shape(p.shape, rank, side), jnp.float32)

        bases = jax.tree.map_with_path(init_leaf, params, mask)
        return ProjectState(count=jnp.zeros([], jnp.int32), bases=bases)

    def update_fn(updates, state, params=None):
        del params
        do_refresh = state.count % update_proj_gap == 0
        key = jax.random.fold_in(jax.random.key(0), state.count)
        leaves_with_path, treedef = jax.tree.flatten_with_path(updates)
        basis_leaves = treedef.flatten_up_to(state.bases)

        new_updates, new_bases = [], []
        for index, ((path, grad), basis) in enumerate(
            zip(leaves_with_path, basis_leaves, strict=True)
        ):
            if basis is None:
                new_updates.append(grad)
                new_bases.append(None)
                continue
            side = side_for_shape(grad.shape, proj_type)
            expected = basis_shape(grad.shape, rank, side)
            if basis.shape != expected:
                raise ValueError(
                    f"project: leaf {_masks.path_str(path)!r} has shape {grad.shape}, which "
                    f"needs a basis of shape {expected}, but the state holds {basis.shape}: "
                    "the state was initialised for different params."
                )
            k = expected[-1] if side == LEFT else expected[-2]
            leaf_key = jax.random.fold_in(key, index)

            def new_basis(grad=grad, basis=basis, side=side, k=k, leaf_key=leaf_key):
                return refresh_basis(grad, basis, k, side, leaf_key, refresh)

            basis = jax.lax.cond(do_refresh, new_basis, lambda basis=basis: basis)
            low_rank = project_matrix(grad, basis, side)
            new_updates.append(
                LowRankUpdate(
                    basis=basis,
                    grad=grad,
                    low_rank=low_rank,
                    direction=low_rank,
                    residual_scale=None,
                    scale=jnp.asarray(scale, jnp.float32),
                    step_scale=jnp.ones([], jnp.float32),
                    side=side,
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


def check_hyperparams(
    *,
    rank: Any = None,
    update_proj_gap: Any = None,
    proj_type: Any = None,
    gamma: Any = None,
) -> None:
    """Early, readable errors for hyper-parameters given as Python values."""
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"rank must be a positive Python int (it sets shapes), got {rank!r}.")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}.")
    if update_proj_gap is not None:
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int):
            raise ValueError(
                f"update_proj_gap must be a positive Python int, got {update_proj_gap!r}."
            )
        if update_proj_gap <= 0:
            raise ValueError(f"update_proj_gap must be positive, got {update_proj_gap}.")
    if proj_type is not None:
        check_proj_type(proj_type)
    if gamma is not None and isinstance(gamma, (int, float)) and gamma < 1:
        raise ValueError(f"gamma must be >= 1 (the allowed norm growth per step), got {gamma}.")
