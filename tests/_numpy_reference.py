"""Float64 NumPy reference implementation of Fira / GaLore AdamW (written from the spec).

Independent of ``fira_optax``'s code. Spec, per projected matrix G (m x n), steps t = 1, 2, ...:

* k = min(rank, m, n). Side: ``std`` -> right if m >= n else left; ``reverse_std`` -> left if
  m >= n else right; ``left`` / ``right`` forced.
* left:  P = U[:, :k] (m x k), R = P^T G (k x n), back(X) = P X.
  right: P = Vh[:k]   (k x n), R = G P^T (m x k), back(X) = X P.
  The low-rank terms of the update are alpha back(X) (alpha = scale).
  Each kept basis vector (column of P for left, row for right) is multiplied by the sign of its
  largest-magnitude entry (first on ties; sign 0 -> +1).
* P is refreshed from the SVD of the current G at t = 1, T+1, 2T+1, ... (moments carried over).
* m <- b1 m + (1-b1) R;  v <- b2 v + (1-b2) R^2;  N = m / (sqrt(v) + eps).
* Fira only: phi = ||N|| / (||R|| + 1e-8), norms over R's rank (k) axis;
  S = phi * (G - alpha back(R)).
  Norm-growth limiter: on the first step g = ||S||_F (no limiting); later
  lam = max(||S|| / (g + 1e-8), gamma) / gamma, S <- S / lam, g <- ||S_before|| / lam.
* W <- W - s_t (alpha back(N) [+ S]),  s_t = lr_t sqrt(1 - b2^t) / (1 - b1^t);
  then if wd > 0: W <- W - lr_t wd W.
* Non-projected leaves: the same AdamW step with R = G (no projection, no S).
* Projected leaves may have leading batch axes (..., m, n): every matrix has its own basis,
  moments and limiter memory.

FRUGAL (``run_frugal_reference``; Zmushko et al., arXiv:2411.07837, Algorithm 1 with Adam as
the state-full and signSGD / SGD as the state-free optimizer), per projected matrix:

* the same k, side, sign-canonical basis and refresh steps t = 1, T+1, ...; back(X) = P X or
  X P (no alpha). With ``reset_statistics``, at a refresh m = v = 0 and tau = 0; otherwise the
  moments are carried and tau counts every step. Then tau <- tau + 1.
* m <- b1 m + (1-b1) R;  v <- b2 v + (1-b2) R^2;
  N = (m / (1 - b1^tau)) / (sqrt(v / (1 - b2^tau)) + eps)   (eps after bias correction).
* E = G - back(R); S = c sign(E) ("sign"), c E ("sgd") or 0 (None); S = 0 for "sign" when k
  is the whole projected side (k = n right, k = m left: E is zero).
* W <- W - lr_t wd W - lr_t (back(N) + S)   (decay of the weights before the step).
* Non-projected leaves: W <- W - lr_t wd W - lr_t m_hat / (sqrt(v_hat) + eps) with tau = t.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["canonical_basis", "projection_side", "run_frugal_reference", "run_reference"]


def projection_side(m: int, n: int, proj_type: str) -> str:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}")


def _sign_canonical(P: np.ndarray, axis: int) -> np.ndarray:
    """Multiply each vector lying along ``axis`` by the sign of its largest-|.| entry."""
    idx = np.argmax(np.abs(P), axis=axis, keepdims=True)  # first maximum on ties
    s = np.sign(np.take_along_axis(P, idx, axis=axis))
    s[s == 0] = 1.0
    return P * s


def canonical_basis(G: np.ndarray, k: int, side: str, svd_dtype=np.float64) -> np.ndarray:
    """Sign-canonical rank-k basis of G: U[:, :k] (left) or Vh[:k] (right), in float64."""
    U, _, Vh = np.linalg.svd(np.asarray(G, dtype=svd_dtype), full_matrices=False)
    if side == "left":
        P = _sign_canonical(U[:, :k].astype(np.float64), axis=0)
    elif side == "right":
        P = _sign_canonical(Vh[:k, :].astype(np.float64), axis=1)
    else:
        raise ValueError(side)
    return P


class _MatrixState:
    """Per-matrix state of a projected matrix."""

    def __init__(self, m: int, n: int, rank: int, proj_type: str):
        self.side = projection_side(m, n, proj_type)
        self.k = min(rank, m, n)
        shape = (self.k, n) if self.side == "left" else (m, self.k)
        self.P: np.ndarray | None = None
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.g: float | None = None  # limiter memory (||S|| of the previous step)

    def project(self, G: np.ndarray) -> np.ndarray:
        return self.P.T @ G if self.side == "left" else G @ self.P.T

    def back(self, X: np.ndarray, alpha: float) -> np.ndarray:
        return alpha * (self.P @ X if self.side == "left" else X @ self.P)


def run_reference(
    kind: str,
    w0: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    lrs: Sequence[float],
    *,
    rank: int,
    update_proj_gap: int,
    scale: float = 1.0,
    proj_type: str = "std",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    gamma: float = 1.01,
    projected: Iterable[str] = (),
    svd_dtype=np.float64,
    trace: list | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run the reference; return float64 weights after every step.

    If ``trace`` is a list, for Fira one dict per step is appended mapping each projected name to
    a list (one entry per matrix) of ``(raw_norm, lam, g)``: ||S|| before limiting, the limiter
    divisor (1.0 on the first step) and the new limiter memory.
    """
    if kind not in ("fira", "galore"):
        raise ValueError(kind)
    if len(grads) != len(lrs):
        raise ValueError("len(grads) != len(lrs)")
    b1, b2 = betas
    projected = set(projected)
    W = {name: np.array(w, dtype=np.float64) for name, w in w0.items()}

    mats: dict[str, list[_MatrixState]] = {}
    plain: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, w in W.items():
        if name in projected:
            if w.ndim < 2:
                raise ValueError(f"projected leaf {name!r} must be >= 2-D, got {w.shape}")
            mdim, ndim = w.shape[-2:]
            count = int(np.prod(w.shape[:-2], dtype=np.int64))
            mats[name] = [_MatrixState(mdim, ndim, rank, proj_type) for _ in range(count)]
        else:
            plain[name] = (np.zeros_like(w), np.zeros_like(w))

    history = []
    for t0, (g_all, lr) in enumerate(zip(grads, lrs, strict=True)):
        t = t0 + 1
        lr = float(lr)
        step = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        refresh = (t - 1) % update_proj_gap == 0
        step_trace = {}
        for name in W:
            G_leaf = np.asarray(g_all[name], dtype=np.float64)
            if name in plain:
                m, v = plain[name]
                m *= b1
                m += (1 - b1) * G_leaf
                v *= b2
                v += (1 - b2) * G_leaf**2
                update = m / (np.sqrt(v) + eps)
            else:
                mdim, ndim = G_leaf.shape[-2:]
                Gs = G_leaf.reshape(-1, mdim, ndim)
                upd = np.empty_like(Gs)
                infos = []
                for i, (G, st) in enumerate(zip(Gs, mats[name], strict=True)):
                    if refresh:
                        st.P = canonical_basis(G, st.k, st.side, svd_dtype)
                    R = st.project(G)
                    st.m = b1 * st.m + (1 - b1) * R
                    st.v = b2 * st.v + (1 - b2) * R**2
                    N = st.m / (np.sqrt(st.v) + eps)
                    u = st.back(N, scale)
                    if kind == "fira":
                        kaxis = 0 if st.side == "left" else 1
                        phi = np.linalg.norm(N, axis=kaxis, keepdims=True) / (
                            np.linalg.norm(R, axis=kaxis, keepdims=True) + 1e-8
                        )
                        S = phi * (G - st.back(R, scale))
                        raw = float(np.linalg.norm(S))
                        if st.g is None:
                            lam = 1.0
                            st.g = raw
                        else:
                            lam = max(raw / (st.g + 1e-8), gamma) / gamma
                            S = S / lam
                            st.g = raw / lam
                        infos.append((raw, lam, st.g))
                        u = u + S
                    upd[i] = u
                update = upd.reshape(G_leaf.shape)
                step_trace[name] = infos
            W[name] = W[name] - step * update
            if weight_decay > 0:
                W[name] = W[name] - lr * weight_decay * W[name]
        if trace is not None and kind == "fira":
            trace.append(step_trace)
        history.append({name: w.copy() for name, w in W.items()})
    return history


def run_frugal_reference(
    w0: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    lrs: Sequence[float],
    *,
    rank: int,
    update_proj_gap: int,
    proj_type: str = "std",
    state_free: str | None = "sign",
    ratio: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    reset_statistics: bool = True,
    projected: Iterable[str] = (),
    svd_dtype=np.float64,
    trace: list | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run the FRUGAL reference (see the module docstring); float64 weights after every step.

    If ``trace`` is a list, one dict per step is appended mapping each projected name to the
    smallest ``|E|`` of its matrices divided by the largest ``|G|`` (how close a sign of the
    residual came to flipping).
    """
    if state_free not in ("sign", "sgd", None):
        raise ValueError(state_free)
    if len(grads) != len(lrs):
        raise ValueError("len(grads) != len(lrs)")
    b1, b2 = betas
    projected = set(projected)
    W = {name: np.array(w, dtype=np.float64) for name, w in w0.items()}
    mats: dict[str, list[_MatrixState]] = {}
    plain: dict[str, list] = {}
    for name, w in W.items():
        if name in projected:
            mdim, ndim = w.shape[-2:]
            count = int(np.prod(w.shape[:-2], dtype=np.int64))
            mats[name] = [_MatrixState(mdim, ndim, rank, proj_type) for _ in range(count)]
            for st in mats[name]:
                st.tau = 0
        else:
            plain[name] = [np.zeros_like(w), np.zeros_like(w)]

    def adam(m, v, tau):
        return (m / (1 - b1**tau)) / (np.sqrt(v / (1 - b2**tau)) + eps)

    history = []
    for t0, (g_all, lr) in enumerate(zip(grads, lrs, strict=True)):
        t = t0 + 1
        lr = float(lr)
        refresh = (t - 1) % update_proj_gap == 0
        closest = {}
        for name in W:
            G_leaf = np.asarray(g_all[name], dtype=np.float64)
            if name in plain:
                m, v = plain[name]
                m[...] = b1 * m + (1 - b1) * G_leaf
                v[...] = b2 * v + (1 - b2) * G_leaf**2
                update = adam(m, v, t)
            else:
                mdim, ndim = G_leaf.shape[-2:]
                Gs = G_leaf.reshape(-1, mdim, ndim)
                upd = np.empty_like(Gs)
                near = []
                for i, (G, st) in enumerate(zip(Gs, mats[name], strict=True)):
                    if refresh:
                        st.P = canonical_basis(G, st.k, st.side, svd_dtype)
                        if reset_statistics:
                            st.m, st.v, st.tau = np.zeros_like(st.m), np.zeros_like(st.v), 0
                    st.tau += 1
                    R = st.project(G)
                    st.m = b1 * st.m + (1 - b1) * R
                    st.v = b2 * st.v + (1 - b2) * R**2
                    u = st.back(adam(st.m, st.v, st.tau), 1.0)
                    E = G - st.back(R, 1.0)
                    whole = st.k == (ndim if st.side == "right" else mdim)
                    if state_free == "sign" and not whole:
                        u = u + ratio * np.sign(E)
                        near.append(np.abs(E).min() / np.abs(G).max())
                    elif state_free == "sgd":
                        u = u + ratio * E
                    upd[i] = u
                update = upd.reshape(G_leaf.shape)
                if near:
                    closest[name] = min(near)
            W[name] = W[name] - lr * weight_decay * W[name] - lr * update
        if trace is not None:
            trace.append(closest)
        history.append({name: w.copy() for name, w in W.items()})
    return history
