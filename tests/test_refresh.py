"""The randomized refresh vs the exact SVD: captured energy, orthonormality, signs, determinism,
and a short training run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_optax as fo
from fira_optax import _refresh
from fira_optax._testing import low_rank_gradient as gradient  # benchmarks/refresh.py's

M, N, K = 192, 448, 48


def _energy(basis, g, side):
    r = basis.T @ g if side == "left" else g @ basis.T
    return float(jnp.sum(jnp.square(r)))


def _zeros(side):
    return jnp.zeros((M, K) if side == "left" else (K, N), jnp.float32)


def _grad(side, seed=1, drift=0.0):
    g = gradient(M, N, seed=seed, drift=drift)
    return jnp.asarray(g if side == "left" else g.T)  # right side: a tall (N, M) matrix


@pytest.mark.parametrize("side", ["left", "right"])
def test_captured_energy_cold_and_warm(side):
    """‖PᵀG‖² of the randomized basis ≥ 0.99 of the exact top-k basis's, cold and warm."""
    g = _grad(side) if side == "left" else _grad(side).T
    g_prev = _grad(side, seed=2, drift=0.05)
    g_prev = g_prev if side == "left" else g_prev.T
    key = jax.random.key(3)
    exact = _refresh.svd_basis(g, K, side)
    e_exact = _energy(exact, g, side)
    cold = _refresh.randomized_basis(g, _zeros(side), K, side, key)
    warm = _refresh.randomized_basis(g, _refresh.svd_basis(g_prev, K, side), K, side, key)
    assert _energy(cold, g, side) >= 0.99 * e_exact
    assert _energy(warm, g, side) >= 0.99 * e_exact
    assert _energy(cold, g, side) <= e_exact * (1 + 1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_orthonormal_and_sign_canonical(side):
    g = jnp.asarray(gradient(M, N, seed=4))
    basis = _refresh.randomized_basis(g, _zeros(side), K, side, jax.random.key(0))
    cols = basis if side == "left" else basis.T  # basis vectors as columns
    np.testing.assert_allclose(cols.T @ cols, np.eye(K), atol=2e-5)
    pivot = jnp.take_along_axis(cols, jnp.argmax(jnp.abs(cols), axis=0)[None], axis=0)
    assert bool(jnp.all(pivot > 0))


def test_stacked_leaf_and_determinism():
    """Same count → same key → bitwise the same basis; a stack is refreshed matrix by matrix."""
    g = jnp.stack([jnp.asarray(gradient(64, 96, seed=s)) for s in (5, 6)])
    fn = jax.jit(lambda g, key: _refresh.randomized_basis(g, jnp.zeros((2, 64, 8)), 8, "left", key))
    a = fn(g, jax.random.fold_in(jax.random.key(0), 7))
    b = fn(g, jax.random.fold_in(jax.random.key(0), 7))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (2, 64, 8)
    assert _energy(a[0], g[0], "left") >= 0.99 * _energy(
        _refresh.svd_basis(g[0], 8, "left"), g[0], "left"
    )

    params = {"w": jnp.zeros((32, 48))}
    tx = fo.fira(1e-2, 8, update_proj_gap=2, refresh="randomized")
    grads = {"w": jnp.asarray(gradient(32, 48, seed=9))}
    s1 = jax.jit(tx.update)(grads, tx.init(params), params)[1]
    s2 = jax.jit(tx.update)(grads, tx.init(params), params)[1]
    np.testing.assert_array_equal(s1[0][0].bases["w"], s2[0][0].bases["w"])


def _train(refresh: str, steps: int = 200) -> float:
    """A 2-layer MLP regression (teacher-student), fira rank 8, refresh every 20 steps."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (256, 32))
    teacher = jax.random.normal(k2, (32, 16)) @ jax.random.normal(k3, (16, 8)) / 6.0
    y = jnp.tanh(x @ teacher)
    params = {
        "w1": 0.2 * jax.random.normal(k4, (32, 64)),
        "b1": jnp.zeros(64),
        "w2": 0.2 * jax.random.normal(jax.random.fold_in(k4, 1), (64, 8)),
    }

    def loss_fn(p):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] - y))

    tx = fo.fira(3e-3, 8, update_proj_gap=20, scale=0.25, refresh=refresh)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    for _ in range(steps):
        params, state, loss = step(params, state)
    return float(loss_fn(params)), float(loss_fn(jax.tree.map(jnp.zeros_like, params)))


def test_randomized_training_matches_svd():
    """200 steps: final loss with refresh="randomized" within 5% (relative) of refresh="svd".

    Measured (CPU, jax 0.10.2): svd 0.0858, randomized 0.0850 (1.0% apart), from 0.787 at
    zero params: the tolerance is 5× the measured gap.
    """
    loss_svd, loss0 = _train("svd")
    loss_rnd, _ = _train("randomized")
    assert loss_svd < 0.5 * loss0
    assert abs(loss_rnd - loss_svd) <= 0.05 * loss_svd, (loss_rnd, loss_svd)
