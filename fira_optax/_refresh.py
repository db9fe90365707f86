"""Basis refresh: how a projected matrix gets its new basis, and the one interface for it.

**Strategies** (`refresh=` of :func:`fira_optax.project`), each one function on the *left
form* `A` (`G`, or `Gᵀ` for a right basis, so that the basis spans the columns of `A`):

- `"svd"`: the top-k singular vectors of the gradient (the reference: Fira, GaLore);
- `"randomized"`: a randomized subspace iteration warm-started from the previous basis;
- `"random"`: a data-independent Gaussian projection, entries `N(0, 1/k)`, drawn anew at every
  refresh (APOLLO's; no decomposition, the refresh costs about nothing);
- `"random_orthonormal"`: a basis drawn uniformly (Haar) from the Stiefel manifold of
  orthonormal k-frames (GoLore's);
- a callable `fn(grad_mxn, basis, key, *, k, side, path, step) -> new basis`: a user's own
  strategy (also how a test injects a reference implementation's projection matrices).

A named strategy is a :class:`Strategy` in :data:`STRATEGIES`: its function
`basis(a_mxn, old_mxk, k, key) -> (m, k)`, its cost (for the staggered schedule and the
divided placement) and whether it reads the gradient. A new kind is that one function and one
entry (plus its name in `_types.RefreshMethod`); both refreshers below run it unchanged.

**Refreshers** (where the strategy runs): a :class:`Refresher` takes the projected leaves of
a step (:class:`RefreshLeaf`: gradient, basis, plan, per-matrix step count, `due` and keys)
and returns their new bases. :class:`LocalRefresh` refreshes each leaf where it is;
`_distributed.DividedRefresh` divides the matrices over a mesh. `project` picks one when it
is constructed (`_distributed.refresher`). Both decide per matrix with
:func:`refresh_if_due` (refresh when due and the gradient is not exactly zero; keep the old
basis when the result is not finite) and draw with :func:`matrix_keys`, so they give the same
bases.

The data-driven bases are *sign-canonical*, in float32: each kept basis vector (a column of
`basis_mxk` for the left side, a row of `basis_kxn` for the right side) is multiplied by the
sign of its entry of largest magnitude (the first such entry on ties; a zero sign counts as +1).
An SVD defines singular vectors only up to sign and LAPACK builds disagree; because Adam's
moments are carried across a refresh in the basis' coordinates, the trajectory depends on that
sign, so we fix it.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, get_args

import jax
import jax.numpy as jnp
import numpy as np

from fira_optax._shapes import LeafPlan
from fira_optax._shapes import active as matrices_active
from fira_optax._types import RefreshMethod

#: A user's refresh: `fn(grad_mxn, basis, key, *, k, side, path, step) -> new basis`.
RefreshFn = Callable[..., jax.Array]

#: `refresh=`: a strategy's name or a user's callable.
Refresh = RefreshMethod | RefreshFn


def check_refresh(refresh: Any) -> None:
    """Raises a ValueError naming the choices unless `refresh` is a known name or callable."""
    if callable(refresh):
        return
    if not isinstance(refresh, str) or refresh not in STRATEGIES:
        raise ValueError(
            f"Unknown refresh {refresh!r}; expected one of {REFRESH_METHODS} or a callable "
            "fn(grad_mxn, basis, key, *, k, side, path, step) -> new basis."
        )


# Randomized refresh defaults: oversampling columns and power (subspace) iterations.
OVERSAMPLE = 8
POWER_ITERS = 2


def refresh_cost(m: int, n: int, k: int, method: Refresh) -> int:
    """The work of refreshing one m×n matrix at rank k, up to a constant (for balancing):
    the strategy's :attr:`Strategy.cost`; a user's callable counts as the exact SVD (as
    costly, for all we know)."""
    strategy = STRATEGIES["svd" if callable(method) else method]
    return strategy.cost(m, n, k)


def canonicalize_signs(basis_mxk: jax.Array) -> jax.Array:
    """Flips each column of `basis_mxk` so that its largest-magnitude entry is positive."""
    index_k = jnp.argmax(jnp.abs(basis_mxk), axis=-2, keepdims=True)
    pivot_1xk = jnp.take_along_axis(basis_mxk, index_k, axis=-2)
    sign_1xk = jnp.where(pivot_1xk < 0, -1.0, 1.0).astype(basis_mxk.dtype)
    return basis_mxk * sign_1xk


def _to_left(grad_mxn: jax.Array, side: str) -> jax.Array:
    """The matrix whose column space is the basis: `G` (left) or `Gᵀ` (right), float32."""
    grad = grad_mxn.astype(jnp.float32)
    return grad if side == "left" else jnp.swapaxes(grad, -1, -2)


def _from_left(basis_mxk: jax.Array, side: str) -> jax.Array:
    return basis_mxk if side == "left" else jnp.swapaxes(basis_mxk, -1, -2)


def svd_basis(grad_mxn: jax.Array, k: int, side: str) -> jax.Array:
    """Top-k singular vectors of the gradient (float32 SVD), sign-canonical.

    Returns `basis_mxk = U[:, :k]` (left) or `basis_kxn = Vh[:k, :]` (right).
    """
    a = _to_left(grad_mxn, side)
    u, _, _ = jnp.linalg.svd(a, full_matrices=False)
    return _from_left(canonicalize_signs(u[..., :k]), side)


def randomized_basis(
    grad_mxn: jax.Array,
    old_basis: jax.Array,
    k: int,
    side: str,
    key: jax.Array,
    *,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
) -> jax.Array:
    """Approximate top-k singular vectors by subspace iteration, warm-started from `old_basis`.

    Only matmuls, a thin QR and a tiny `l×l` symmetric eigendecomposition (`l = k + oversample`):
    it runs well on TPU and partitions under SPMD, unlike a full SVD.

    1. Start block `X = [P_old | A Ω]` (`A = G` or `Gᵀ`, `Ω` Gaussian with `oversample` columns);
       on the first refresh (`P_old = 0`) the whole block is `A Ω`.
    2. `power_iters` times: `Q = qr(A (Aᵀ Q))`.
    3. Rayleigh–Ritz: eigenvectors `W` of `(Qᵀ A)(Qᵀ A)ᵀ`, basis = `Q W[:, top k]`, sign-canonical.

    The Gaussian sketch comes from `key`, which `project` derives from the step count: runs are
    deterministic without any key management by the user.
    """
    a_mxn = _to_left(grad_mxn, side)
    old_mxk = _from_left(old_basis.astype(jnp.float32), side)
    m, n = a_mxn.shape[-2:]
    extra = max(0, min(oversample, min(m, n) - k))
    batch = a_mxn.shape[:-2]
    omega_nxl = jax.random.normal(key, (*batch, n, k + extra), jnp.float32)
    sketch_mxl = a_mxn @ omega_nxl
    cold = jnp.all(old_mxk == 0, axis=(-2, -1), keepdims=True)
    warm_mxk = jnp.where(cold, sketch_mxl[..., :k], old_mxk)
    x_mxl = jnp.concatenate([warm_mxk, sketch_mxl[..., k:]], axis=-1)
    q_mxl, _ = jnp.linalg.qr(x_mxl)
    for _ in range(power_iters):
        q_mxl, _ = jnp.linalg.qr(a_mxn @ (jnp.swapaxes(a_mxn, -1, -2) @ q_mxl))
    b_lxn = jnp.swapaxes(q_mxl, -1, -2) @ a_mxn
    gram_lxl = b_lxn @ jnp.swapaxes(b_lxn, -1, -2)
    _, eigvecs_lxl = jnp.linalg.eigh(gram_lxl)  # ascending eigenvalues
    top_lxk = eigvecs_lxl[..., ::-1][..., :k]
    basis_mxk = q_mxl @ top_lxk
    return _from_left(canonicalize_signs(basis_mxk), side)


def random_basis(m: int, k: int, key: jax.Array, *, orthonormal: bool) -> jax.Array:
    """A data-independent `m×k` basis: Gaussian entries `N(0, 1/k)` (APOLLO's projection), or
    with `orthonormal` a Haar-uniform orthonormal k-frame (the QR of a Gaussian matrix, signs
    fixed by `diag(R) > 0`; GoLore's projection)."""
    gauss_mxk = jax.random.normal(key, (m, k), jnp.float32)
    if not orthonormal:
        return gauss_mxk / jnp.sqrt(jnp.float32(k))
    q_mxk, r_kxk = jnp.linalg.qr(gauss_mxk)
    sign_k = jnp.where(jnp.diagonal(r_kxk) < 0, -1.0, 1.0).astype(jnp.float32)
    return q_mxk * sign_k[None, :]


# ----------------------------------------------------------------------------------------------
# The strategies: one function each, on the left form.


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A named refresh kind.

    Attributes:
      basis: `basis(a_mxn, old_mxk, k, key) -> (m, k)`: the new basis of one matrix in left
        form (`a_mxn` float32; `old_mxk` the previous basis in left form, zeros before the
        first refresh; `key` this matrix's key for this refresh).
      cost: `cost(m, n, k)`, the work of one refresh up to a constant (for the staggered
        offsets and the divided placement; symmetric in m and n).
      reads_gradient: False for a data-free strategy (no gradient moves to draw it, so it is
        never divided over a mesh: each device draws what its sharded state holds).
      orthonormal: whether its bases have orthonormal columns (read by the blocks that
        transport moments from one basis to the next).
    """

    basis: Callable[[jax.Array, jax.Array, int, jax.Array], jax.Array]
    cost: Callable[[int, int, int], int]
    reads_gradient: bool = True
    orthonormal: bool = True


#: The named strategies (`refresh="svd"`, ...): a new kind is one entry here.
STRATEGIES: dict[str, Strategy] = {
    "svd": Strategy(
        basis=lambda a_mxn, old_mxk, k, key: svd_basis(a_mxn, k, "left"),
        cost=lambda m, n, k: m * n * min(m, n),  # the thin SVD costs the same whatever k
    ),
    "randomized": Strategy(
        basis=lambda a_mxn, old_mxk, k, key: randomized_basis(a_mxn, old_mxk, k, "left", key),
        cost=lambda m, n, k: m * n * min(k + OVERSAMPLE, m, n),  # its matmuls
    ),
    "random": Strategy(
        basis=lambda a_mxn, old_mxk, k, key: random_basis(
            a_mxn.shape[-2], k, key, orthonormal=False
        ),
        cost=lambda m, n, k: max(m, n) * k,  # the draw
        reads_gradient=False,
        orthonormal=False,
    ),
    "random_orthonormal": Strategy(
        basis=lambda a_mxn, old_mxk, k, key: random_basis(
            a_mxn.shape[-2], k, key, orthonormal=True
        ),
        cost=lambda m, n, k: max(m, n) * k * k,  # the draw and its QR
        reads_gradient=False,
    ),
}
assert tuple(STRATEGIES) == get_args(RefreshMethod)

REFRESH_METHODS = tuple(STRATEGIES)

#: The strategies that do not read the gradient (any device can draw any basis).
DATA_FREE = tuple(name for name, s in STRATEGIES.items() if not s.reads_gradient)


def orthonormal(refresh: Refresh) -> bool:
    """Whether `refresh` gives orthonormal bases (a user's callable: not assumed)."""
    return not callable(refresh) and STRATEGIES[refresh].orthonormal


def left_form_basis(
    method: RefreshMethod, a_mxn: jax.Array, old_mxk: jax.Array | None, k: int, key: jax.Array
) -> jax.Array:
    """A named strategy's new basis on the left form (`A = G` or `Gᵀ`, float32): `(m, k)`."""
    return STRATEGIES[method].basis(a_mxn, old_mxk, k, key)


# ----------------------------------------------------------------------------------------------
# The rules both refreshers share: keys, and when a matrix takes its new basis.


def matrix_keys(key: jax.Array, batch_shape: tuple[int, ...], path: str | None = None):
    """The keys of a leaf's matrices for one refresh, flat `(prod(batch_shape),)`.

    `key` is the step's key (`project` folds the step count into its seed); with `path` the
    leaf's key path is folded in first (stable under `optax.masked` / `multi_transform`), then
    a stack of matrices splits it, one key per matrix (a single matrix uses it as is).
    """
    if path is not None:
        key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    if not batch_shape:
        return key[None]
    return jax.random.split(key, math.prod(batch_shape))


def refresh_if_due(
    compute: Callable[[], jax.Array], grad_mxn: jax.Array, due: jax.Array, shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """One matrix's refresh: `(candidate, refreshed)`; where `refreshed` is False the matrix
    keeps its old basis (and `candidate` is zeros of `shape`).

    A matrix is refreshed when it is `due` and its gradient is not exactly zero — an idle
    expert or a frozen layer keeps its basis (the SVD of zero would replace it by an arbitrary
    one) — and the new basis is finite (a non-finite gradient, an SVD that did not converge:
    the old basis stays). `compute` runs only for a refreshed matrix (`lax.cond`).
    """

    def go():
        candidate = compute()
        return candidate, jnp.all(jnp.isfinite(candidate))

    def skip():
        return jnp.zeros(shape, jnp.float32), jnp.zeros((), bool)

    return jax.lax.cond(due & matrices_active(grad_mxn), go, skip)


# ----------------------------------------------------------------------------------------------
# The interface, and the refresh where each leaf is.


class RefreshLeaf(NamedTuple):
    """One projected leaf handed to a :class:`Refresher` at a step.

    Attributes:
      grad: the gradient leaf, in the param's shape.
      basis: its current basis `(*batch, m, k)` (left) or `(*batch, k, n)` (right), zeros
        before the first refresh.
      plan: the leaf's static plan (matrix view, side, k, key path).
      steps: per matrix, the steps it took before this one (int32, stack shape).
      due: per matrix, whether the schedule refreshes it at this step (bool, stack shape).
      offset: its staggered offsets (stack shape, static), or None (official schedule).
      keys: per matrix, its key for this refresh, flat (:func:`matrix_keys`).
    """

    grad: jax.Array
    basis: jax.Array
    plan: LeafPlan
    steps: jax.Array
    due: jax.Array
    offset: np.ndarray | None
    keys: jax.Array


class Refresher(Protocol):
    """Where a strategy runs: `refresher(leaves) -> new bases`, one per leaf, in the state's
    shape and layout (a matrix not refreshed keeps its basis)."""

    def __call__(self, leaves: Sequence[RefreshLeaf]) -> list[jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class LocalRefresh:
    """Every leaf refreshed where it is, one matrix at a time.

    Under SPMD the partitioner all-gathers each refreshed gradient and every device computes
    every decomposition (`_distributed.DividedRefresh` divides them instead). A leaf with no
    matrix due skips its refresh (`lax.cond`).
    """

    refresh: Refresh

    def __call__(self, leaves: Sequence[RefreshLeaf]) -> list[jax.Array]:
        return [self.leaf(leaf) for leaf in leaves]

    def leaf(self, leaf: RefreshLeaf) -> jax.Array:
        plan = leaf.plan
        grad_mxn = plan.view.to_matrix(leaf.grad)

        def new_basis():
            return _refresh_matrices(
                grad_mxn,
                leaf.basis,
                plan.k,
                plan.side,
                leaf.keys,
                self.refresh,
                leaf.due,
                path=plan.path,
                steps=leaf.steps,
            )

        return jax.lax.cond(jnp.any(leaf.due), new_basis, lambda: leaf.basis)


def refresh_basis(
    grad: jax.Array,
    basis: jax.Array,
    k: int,
    side: str,
    key: jax.Array,
    refresh: Refresh,
    due: jax.Array | None = None,
    *,
    path: str = "",
    steps: jax.Array | None = None,
) -> jax.Array:
    """A new basis for the due matrices of a (stack of) matrices `(..., m, n)`, with `key`
    the leaf's key (split per matrix by :func:`matrix_keys`): :class:`LocalRefresh`'s work on
    one leaf.

    `refresh` is a strategy name (see the module) or a callable, called per matrix as
    `refresh(grad_mxn, basis, key, k=k, side=side, path=path, step=step)` with the float32
    gradient `(m, n)`, the old basis (zeros before the first refresh), a per-matrix key, and
    the leaf's key path and the matrix's step count before this step (int32; the refresh
    number is `step // update_proj_gap` on the official schedule); it returns the new basis
    in the old one's shape.

    Which matrices take a new basis is :func:`refresh_if_due`'s (`due`: a bool per matrix,
    shape `(...)`; default: all).
    """
    keys = matrix_keys(key, tuple(grad.shape[:-2]))
    return _refresh_matrices(grad, basis, k, side, keys, refresh, due, path=path, steps=steps)


def _refresh_matrices(grad, basis, k, side, keys, refresh, due, *, path, steps):
    """:func:`refresh_basis` with the per-matrix keys given (flat, as :func:`matrix_keys`).

    Stacked leaves are refreshed one matrix at a time (`lax.map`): XLA:CPU's batched LAPACK
    kernels split a batch over the intra-op thread pool and block on it, which can deadlock
    when several host devices run at once; one matrix per call avoids that and costs nothing
    on CPU (each SVD is already sequential LAPACK work).
    """

    def one(grad_mxn, basis_old, key_one, due_one, step_one):
        def compute():
            if callable(refresh):
                candidate = refresh(
                    grad_mxn.astype(jnp.float32),
                    basis_old,
                    key_one,
                    k=k,
                    side=side,
                    path=path,
                    step=step_one,
                )
                candidate = jnp.asarray(candidate, jnp.float32)
                if candidate.shape != basis_old.shape:
                    raise ValueError(
                        f"refresh: the callable returned a basis of shape {candidate.shape} "
                        f"for leaf {path!r}, which needs {basis_old.shape} ({side} side, "
                        f"k={k})."
                    )
                return candidate
            a_mxn = _to_left(grad_mxn, side)
            old_mxk = _from_left(basis_old.astype(jnp.float32), side)
            return _from_left(left_form_basis(refresh, a_mxn, old_mxk, k, key_one), side)

        candidate, refreshed = refresh_if_due(compute, grad_mxn, due_one, basis_old.shape)
        return jnp.where(refreshed, candidate, basis_old)

    batch = grad.shape[:-2]
    due = jnp.ones(batch, bool) if due is None else jnp.broadcast_to(due, batch)
    steps = jnp.zeros(batch, jnp.int32) if steps is None else jnp.broadcast_to(steps, batch)
    if not batch:
        return one(grad, basis, keys[0], due, steps)
    size = math.prod(batch)
    flat = jax.lax.map(
        lambda args: one(*args),
        (
            grad.reshape(size, *grad.shape[-2:]),
            basis.reshape(size, *basis.shape[-2:]),
            keys,
            due.reshape(size),
            steps.reshape(size),
        ),
    )
    return flat.reshape(basis.shape)
