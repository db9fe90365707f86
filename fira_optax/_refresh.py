"""Basis refresh strategies: how a projected matrix gets its new basis.

- `"svd"`: the top-k singular vectors of the gradient (the reference: Fira, GaLore);
- `"randomized"`: a randomized subspace iteration warm-started from the previous basis;
- `"random"`: a data-independent Gaussian projection, entries `N(0, 1/k)`, drawn anew at every
  refresh (APOLLO's; no decomposition, the refresh costs about nothing);
- `"random_orthonormal"`: a basis drawn uniformly (Haar) from the Stiefel manifold of
  orthonormal k-frames (GoLore's);
- a callable `fn(grad_mxn, basis, key, *, k, side, path, step) -> new basis`: a user's own
  strategy (also how a test injects a reference implementation's projection matrices).

The data-driven bases are *sign-canonical*, in float32: each kept basis vector (a column of
`basis_mxk` for the left side, a row of `basis_kxn` for the right side) is multiplied by the
sign of its entry of largest magnitude (the first such entry on ties; a zero sign counts as +1).
An SVD defines singular vectors only up to sign and LAPACK builds disagree; because Adam's
moments are carried across a refresh in the basis' coordinates, the trajectory depends on that
sign, so we fix it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

REFRESH_METHODS = ("svd", "randomized", "random", "random_orthonormal")

#: The strategies that do not read the gradient (any device can draw any basis).
DATA_FREE = ("random", "random_orthonormal")

#: A user's refresh: `fn(grad_mxn, basis, key, *, k, side, path, step) -> new basis`.
RefreshFn = Callable[..., jax.Array]


def check_refresh(refresh: Any) -> None:
    """Raises a ValueError naming the choices unless `refresh` is a known name or callable."""
    if callable(refresh):
        return
    if not isinstance(refresh, str) or refresh not in REFRESH_METHODS:
        raise ValueError(
            f"Unknown refresh {refresh!r}; expected one of {REFRESH_METHODS} or a callable "
            "fn(grad_mxn, basis, key, *, k, side, path, step) -> new basis."
        )


# Randomized refresh defaults: oversampling columns and power (subspace) iterations.
OVERSAMPLE = 8
POWER_ITERS = 2


def refresh_cost(m: int, n: int, k: int, method: str) -> int:
    """The work of refreshing one m×n matrix at rank k, up to a constant (for balancing).

    `m·n·min(m, n)` for the exact (thin) SVD, whatever k (and for a user's callable);
    `m·n·(k + oversample)` for the randomized refresh (its matmuls); `max(m, n)·k` to draw a
    random projection (`·k` more for the QR of an orthonormal one).
    """
    if method in DATA_FREE:
        return max(m, n) * k * (k if method == "random_orthonormal" else 1)
    if method == "randomized":
        return m * n * min(k + OVERSAMPLE, m, n)
    return m * n * min(m, n)  # the SVD, and a user's strategy (as costly, for all we know)


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


def left_form_basis(
    method: str, a_mxn: jax.Array, old_mxk: jax.Array | None, k: int, key: jax.Array
) -> jax.Array:
    """A named strategy's new basis on the left form (`A = G` or `Gᵀ`, float32): `(m, k)`."""
    if method == "svd":
        return svd_basis(a_mxn, k, "left")
    if method == "randomized":
        return randomized_basis(a_mxn, old_mxk, k, "left", key)
    return random_basis(a_mxn.shape[-2], k, key, orthonormal=method == "random_orthonormal")


def refresh_basis(
    grad: jax.Array,
    basis: jax.Array,
    k: int,
    side: str,
    key: jax.Array,
    refresh: str | RefreshFn,
    due: jax.Array | None = None,
    *,
    path: str = "",
    steps: jax.Array | None = None,
) -> jax.Array:
    """A new basis for the due matrices of a (stack of) matrices `(..., m, n)`.

    `refresh` is a strategy name (see the module) or a callable, called per matrix as
    `refresh(grad_mxn, basis, key, k=k, side=side, path=path, step=step)` with the float32
    gradient `(m, n)`, the old basis (zeros before the first refresh), a per-matrix key, and
    the leaf's key path and the matrix's step count before this step (int32; the refresh
    number is `step // update_proj_gap` on the official schedule); it returns the new basis
    in the old one's shape.

    A matrix is refreshed when it is `due` (a bool per matrix, shape `(...)`; default: all)
    and its gradient is not exactly zero — an idle expert or a frozen layer keeps its basis (the
    SVD of zero would replace it by an arbitrary one), and so does a matrix whose refresh fails
    (non-finite gradient, an SVD that did not converge). The decomposition runs only for the
    matrices refreshed (`lax.cond` per matrix).

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
            else:
                a_mxn = _to_left(grad_mxn, side)
                old_mxk = _from_left(basis_old.astype(jnp.float32), side)
                candidate = _from_left(left_form_basis(refresh, a_mxn, old_mxk, k, key_one), side)
            return jnp.where(jnp.all(jnp.isfinite(candidate)), candidate, basis_old)

        go = due_one & jnp.any(grad_mxn != 0)
        return jax.lax.cond(go, compute, lambda: basis_old)

    batch = grad.shape[:-2]
    due = jnp.ones(batch, bool) if due is None else jnp.broadcast_to(due, batch)
    steps = jnp.zeros(batch, jnp.int32) if steps is None else jnp.broadcast_to(steps, batch)
    if not batch:
        return one(grad, basis, key, due, steps)
    size = math.prod(batch)
    keys = jax.random.split(key, size)
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
