"""Basis refresh: the exact SVD (the reference) and a randomized subspace iteration.

Both return a *sign-canonical* orthonormal basis in float32: each kept basis vector (a column
of `basis_mxk` for the left side, a row of `basis_kxn` for the right side) is multiplied by the
sign of its entry of largest magnitude (the first such entry on ties; a zero sign counts as +1).
An SVD defines singular vectors only up to sign and LAPACK builds disagree; because Adam's
moments are carried across a refresh in the basis' coordinates, the trajectory depends on that
sign, so we fix it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

REFRESH_METHODS = ("svd", "randomized")

# Randomized refresh defaults: oversampling columns and power (subspace) iterations.
OVERSAMPLE = 8
POWER_ITERS = 2


def refresh_cost(m: int, n: int, k: int, method: str) -> int:
    """The work of refreshing one m×n matrix at rank k, up to a constant (for balancing).

    `m·n·min(m, n)` for the exact (thin) SVD, whatever k; `m·n·(k + oversample)` for the
    randomized refresh (its matmuls).
    """
    if method == "svd":
        return m * n * min(m, n)
    return m * n * min(k + OVERSAMPLE, m, n)


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


def refresh_basis(
    grad: jax.Array,
    basis: jax.Array,
    k: int,
    side: str,
    key: jax.Array,
    refresh: str,
    due: jax.Array | None = None,
) -> jax.Array:
    """A new basis for the due matrices of a (stack of) matrices `(..., m, n)`.

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

    def one(grad_mxn, basis_old, key_one, due_one):
        def compute():
            if refresh == "svd":
                candidate = svd_basis(grad_mxn, k, side)
            else:
                candidate = randomized_basis(grad_mxn, basis_old, k, side, key_one)
            return jnp.where(jnp.all(jnp.isfinite(candidate)), candidate, basis_old)

        go = due_one & jnp.any(grad_mxn != 0)
        return jax.lax.cond(go, compute, lambda: basis_old)

    batch = grad.shape[:-2]
    due = jnp.ones(batch, bool) if due is None else jnp.broadcast_to(due, batch)
    if not batch:
        return one(grad, basis, key, due)
    size = math.prod(batch)
    keys = jax.random.split(key, size)
    flat = jax.lax.map(
        lambda args: one(*args),
        (
            grad.reshape(size, *grad.shape[-2:]),
            basis.reshape(size, *basis.shape[-2:]),
            keys,
            due.reshape(size),
        ),
    )
    return flat.reshape(basis.shape)
