"""GoLore (He et al., arXiv 2410.11289) against a float64 NumPy reference of its algorithm.

GoLore is GaLore whose basis is the top-k SVD for the first `svd_steps` steps of a matrix and
a Haar-uniform random orthonormal basis afterwards, and whose first moment is carried into
the new basis at every refresh, `m ← P_newᵀ P_old m` (left) / `m ← m P_old P_newᵀ` (right), as
the reference implementation (its ReLoRA-style `merge_and_reinit`) does; the second moment is
kept as it is. The random bases of both sides come from one table (`refresh=` callable on
ours), so the comparison is step for step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _harness import relative_errors, run_ours
from _numpy_reference import canonical_basis, projection_side

import fira_optax as fo
from fira_optax._testing import make_problem

STEPS, GAP, RANK, SVD_STEPS = 24, 4, 6, 9  # refreshes at steps 1, 5, 9 (SVD), 13, 17, 21
SHAPES = {"tall": (40, 24), "wide": (20, 36), "bias": (24,)}
PROJECTED = ("tall", "wide")


def random_table(shapes, seed=0):
    """A Haar-random orthonormal basis per leaf and refresh number: `table[name][j]`."""
    rng = np.random.default_rng(seed)
    table = {}
    for name in PROJECTED:
        m, n = shapes[name]
        side = projection_side(m, n, "std")
        k = min(RANK, m, n)
        dim = m if side == "left" else n
        bases = []
        for _ in range(STEPS // GAP + 1):
            q, r = np.linalg.qr(rng.standard_normal((dim, k)))
            q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
            bases.append((q if side == "left" else q.T).astype(np.float32))
        table[name] = np.stack(bases)
    return table


def golore_reference(w0, grads, lr, table, *, scale=1.0, betas=(0.9, 0.999), eps=1e-6, wd=0.0):
    """Float64 GoLore-AdamW: weights after every step."""
    b1, b2 = betas
    W = {k: np.array(v, np.float64) for k, v in w0.items()}
    state = {k: {"P": None, "m": 0.0, "v": 0.0} for k in W}
    history = []
    for t0, g_all in enumerate(grads):
        t = t0 + 1
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for name, w in W.items():
            G = np.asarray(g_all[name], np.float64)
            st = state[name]
            if name in PROJECTED:
                side = projection_side(*G.shape, "std")
                k = min(RANK, *G.shape)
                if t0 % GAP == 0:
                    new = (
                        canonical_basis(G, k, side)
                        if t0 < SVD_STEPS
                        else np.asarray(table[name][t0 // GAP], np.float64)
                    )
                    if st["P"] is not None:  # carry the first moment into the new basis
                        old = st["P"]
                        st["m"] = (
                            new.T @ (old @ st["m"]) if side == "left" else (st["m"] @ old) @ new.T
                        )
                    st["P"] = new
                P = st["P"]
                R = P.T @ G if side == "left" else G @ P.T
            else:
                R = G
            st["m"] = b1 * st["m"] + (1 - b1) * R
            st["v"] = b2 * st["v"] + (1 - b2) * R**2
            N = st["m"] / (np.sqrt(st["v"]) + eps)
            if name in PROJECTED:
                N = scale * (P @ N if side == "left" else N @ P)
            W[name] = w - step * N
            if wd:
                W[name] = W[name] - lr * wd * W[name]
        history.append({k: v.copy() for k, v in W.items()})
    return history


def run_golore(w0, grads, lr, table, **kwargs):
    def injected(grad_mxn, basis, key, *, k, side, path, step):
        return jnp.asarray(table[path])[step // GAP]

    tx = fo.golore(
        lr,
        RANK,
        update_proj_gap=GAP,
        svd_steps=SVD_STEPS,
        refresh=injected,
        projected={name: name in PROJECTED for name in w0},
        **kwargs,
    )
    params = jax.tree.map(jnp.asarray, w0)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for g in grads:
        params, state = step(params, state, jax.tree.map(jnp.asarray, g))
        history.append(jax.tree.map(np.asarray, params))
    return history


@pytest.mark.parametrize("scale, wd", [(1.0, 0.0), (0.25, 0.1)])
def test_golore_matches_the_reference(scale, wd):
    w0, grads = make_problem(SHAPES, STEPS, seed=3)
    table = random_table(SHAPES)
    ours = run_golore(w0, grads, 1e-2, table, scale=scale, weight_decay=wd or None)
    ref = golore_reference(w0, grads, 1e-2, table, scale=scale, wd=wd)
    errors = relative_errors(ours, ref, w0)
    print(errors)
    assert max(errors.values()) <= 1e-4, errors


def test_golore_with_only_svd_steps_is_galore_plus_transport():
    """While every refresh is an SVD refresh, GoLore differs from GaLore only by carrying
    the first moment into the new basis: before the second refresh they agree."""
    w0, grads = make_problem(SHAPES, STEPS, seed=4)
    galore = run_ours(
        "galore", w0, grads, 1e-2, rank=RANK, update_proj_gap=GAP, projected=PROJECTED
    )
    golore = run_golore(w0, grads, 1e-2, random_table(SHAPES))
    before = relative_errors(golore[:GAP], galore[:GAP], w0)
    after = relative_errors(golore, galore, w0)
    assert max(before.values()) <= 1e-5, before
    assert min(after[name] for name in PROJECTED) > 1e-3, after  # the transport matters


def test_golore_random_phase_draws_orthonormal_bases():
    """With the default strategy, the refreshes before `svd_steps` take the gradient's top
    singular vectors and the later ones draw orthonormal bases that are not."""
    params = {"w": jnp.zeros((32, 16))}
    tx = fo.golore(1e-2, 4, update_proj_gap=2, svd_steps=2, projected={"w": True})
    state = tx.init(params)
    update = jax.jit(lambda g, s: tx.update(g, s, params)[1])
    g = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
    svd = np.asarray(fo._refresh.svd_basis(g["w"], 4, "right"))  # (4, 16): right side
    bases = []
    for _ in range(5):  # refreshes at steps 1, 3, 5
        state = update(g, state)
        bases.append(np.asarray(optax.tree_utils.tree_get(state, "bases")["w"]))
    np.testing.assert_allclose(bases[0], svd, atol=1e-5)  # step 1: SVD
    for basis in (bases[2], bases[4]):  # steps 3 and 5: random
        np.testing.assert_allclose(basis @ basis.T, np.eye(4), atol=2e-6)
        assert np.linalg.norm(basis @ svd.T) < 0.95 * 2  # not the top-4 subspace (norm 2)
    np.testing.assert_array_equal(bases[2], bases[3])  # kept between refreshes
    assert not np.allclose(bases[2], bases[4])  # a new draw at every refresh
