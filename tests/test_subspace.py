"""Any optax transform inside the subspace (`base_optimizer=`, `fo.in_subspace`).

Identities that must hold: with `optax.identity()` Fira's update is exactly `G` (φ = 1, for
any α, while the limiter does not engage) and GaLore's is `α·G·V_k·V_kᵀ`; `scale_by_rms` and
`scale_by_factored_rms` keep their state at the low-rank shapes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _roundoff import ROUND_OFF, assert_round_off

import fira_optax as fo

M, N, RANK = 48, 20, 6


def gradients(steps, seed=0):
    """Gradients whose norm halves every step (the limiter never engages), with entries ≥ O(1)
    so that φ = ‖R‖ / (‖R‖ + 1e-8) rounds to exactly 1 in float32."""
    keys = jax.random.split(jax.random.key(seed), steps)
    return [
        {"w": 8 * (0.5**t) * jax.random.normal(k, (M, N)), "b": jax.random.normal(k, (N,))}
        for t, k in enumerate(keys)
    ]


class TestIdentity(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fira_with_identity_is_the_gradient(self):
        for alpha in (1.0, 0.25, 3.0):
            tx = fo.scale_by_fira(
                RANK, update_proj_gap=2, scale=alpha, base_optimizer=optax.identity()
            )
            state = tx.init(gradients(1)[0])
            update = self.variant(tx.update)
            max_err = 0.0
            for g in gradients(4):
                u, state = update(g, state)
                chex.assert_trees_all_equal(u, g)  # exactly: N − φR = 0 and φ = 1
                max_err = max(max_err, float(jnp.max(jnp.abs(u["w"] - g["w"]))))
            print(f"fira(identity) α={alpha}: max |update − G| = {max_err:.1e}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_galore_with_identity_is_the_projection(self):
        alpha = 0.25
        tx = fo.scale_by_galore(
            RANK, update_proj_gap=100, scale=alpha, base_optimizer=optax.identity()
        )
        grads = gradients(3)
        state = tx.init(grads[0])
        update = self.variant(tx.update)
        g0 = np.asarray(grads[0]["w"], np.float64)
        v_k = np.linalg.svd(g0)[2][:RANK].T  # right side (M ≥ N): P = V_kᵀ from step 1
        worst = 0.0
        for g in grads:
            u, state = update(g, state)
            expected = alpha * np.asarray(g["w"], np.float64) @ v_k @ v_k.T
            err = np.abs(np.asarray(u["w"]) - expected).max() / np.abs(expected).max()
            worst = max(worst, err)
            chex.assert_trees_all_equal(u["b"], g["b"])  # a dense leaf: identity too
        print(f"galore(identity): max relative error vs α·G·V_k·V_kᵀ (float64) = {worst:.1e}")
        assert worst < 1e-5


@pytest.mark.parametrize(
    "base, expected_inner",
    [
        (optax.scale_by_rms(), "nu"),
        (optax.scale_by_factored_rms(min_dim_size_to_factor=8), "v_row"),
    ],
    ids=["rms", "factored_rms"],
)
def test_base_optimizer_state_is_low_rank(base, expected_inner):
    params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros(128)}
    tx = fo.fira(1e-2, 16, base_optimizer=base)
    state = tx.init(params)
    is_subspace = lambda x: isinstance(x, fo.InSubspaceState)
    assert any(map(is_subspace, jax.tree.leaves(state, is_leaf=is_subspace)))
    inner = optax.tree_utils.tree_get(state, "inner")
    leaves = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree.leaves_with_path(inner)}
    w_shapes = [s for k, s in leaves.items() if "'w'" in k]
    # Right side (256 ≥ 128): R is 256×16; nothing of the 256×128 size is kept.
    assert all(np.prod(s) <= 256 * 16 for s in w_shapes), leaves
    if expected_inner == "nu":
        assert (256, 16) in w_shapes
    else:
        assert (256,) in w_shapes and (16,) in w_shapes
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    adam_state = fo.fira(1e-2, 16).init(params)
    print(
        f"{expected_inner}: fira state {nbytes(state)} B, with low-rank Adam "
        f"{nbytes(adam_state)} B, optax.adamw {nbytes(optax.adamw(1e-2).init(params))} B"
    )
    grads = jax.tree.map(jnp.ones_like, params)
    grads["w"] = jax.random.normal(jax.random.key(0), (256, 128))
    u, state2 = jax.jit(tx.update)(grads, state, params)
    chex.assert_tree_all_finite(u)
    chex.assert_trees_all_equal_shapes(state, state2)


@pytest.mark.parametrize(
    "base, lr",
    [(optax.scale_by_adam(), 3e-2), (optax.scale_by_lion(), 2e-2), (optax.trace(decay=0.9), 1e-1)],
    ids=["adam", "lion", "momentum"],
)
def test_base_optimizers_train(base, lr):
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    params = {"w": jnp.zeros((32, 16))}
    loss = lambda p: jnp.mean((x @ p["w"] - x @ target) ** 2)
    tx = fo.fira(lr, 4, update_proj_gap=10, base_optimizer=base)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    l0 = float(loss(params))
    for _ in range(100):
        params, state = step(params, state)
    assert float(loss(params)) < 0.5 * l0


def test_in_subspace_block_in_a_chain_equals_the_alias():
    spec = fo.ProjectionSpec(RANK)
    chain = optax.chain(
        fo.project(spec=spec, update_proj_gap=2, scale=0.5),
        fo.in_subspace(spec, optax.scale_by_rms()),
        fo.norm_scale_residual(),
        fo.limit_norm_growth(spec),
        fo.project_back(),
    )
    alias = fo.scale_by_fira(
        RANK, update_proj_gap=2, scale=0.5, base_optimizer=optax.scale_by_rms()
    )
    s1, s2 = chain.init(gradients(1)[0]), alias.init(gradients(1)[0])
    for g in gradients(4):
        u1, s1 = jax.jit(chain.update)(g, s1)
        u2, s2 = jax.jit(alias.update)(g, s2)
        # The same blocks, built by hand and by the alias, jitted separately: float32 round-off.
        assert_round_off(u1, u2, ROUND_OFF, "chain vs alias")


def test_base_optimizer_and_mu_dtype_conflict():
    with pytest.raises(ValueError, match="mu_dtype"):
        fo.fira(1e-2, 4, base_optimizer=optax.scale_by_rms(), mu_dtype=jnp.bfloat16)


def test_in_subspace_with_another_spec_fails_naming_the_leaf():
    params = {"w": jnp.ones((16, 8))}
    chain = optax.chain(
        fo.project(fo.ProjectionSpec(4)),
        fo.in_subspace(fo.ProjectionSpec(2), optax.scale_by_rms()),
        fo.project_back(),
    )
    with pytest.raises(ValueError, match="'w'"):
        chain.update(params, chain.init(params))
