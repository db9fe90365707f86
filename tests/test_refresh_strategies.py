"""The refresh strategies: data-independent bases ("random", "random_orthonormal"), a user's
callable, the seed, and what each strategy's basis is (distribution, orthonormality)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_optax as fo

PARAMS = {"tall": jnp.zeros((96, 40)), "wide": jnp.zeros((24, 80)), "bias": jnp.zeros(40)}
RANK, GAP = 8, 3


def _bases(tx_kwargs, steps=GAP + 1, grads=None):
    """The projected leaves' bases after each step of `fo.project`, as NumPy arrays."""
    tx = fo.project(fo.ProjectionSpec(RANK), update_proj_gap=GAP, **tx_kwargs)
    state = tx.init(PARAMS)
    update = jax.jit(lambda g, s: tx.update(g, s)[1])  # the state: nodes are no arrays
    out = []
    for t in range(steps):
        g = (
            grads[t]
            if grads
            else jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape), PARAMS)
        )
        state = update(g, state)
        out.append({k: np.asarray(v) for k, v in state.bases.items() if v is not None})
    return out


def test_random_basis_is_gaussian_with_variance_one_over_k():
    """Entries N(0, 1/k) as in APOLLO: over 96·8 + 8·80 = 1408 entries the sample mean is
    within 5 standard errors of 0 (σ/√n = 0.0094) and the variance within 15 % of 1/8."""
    bases = _bases({"refresh": "random"})[0]
    entries = np.concatenate([b.ravel() for b in bases.values()])
    se = np.sqrt(1 / RANK / entries.size)
    assert abs(entries.mean()) < 5 * se, entries.mean()
    assert entries.var() == pytest.approx(1 / RANK, rel=0.15)
    assert bases["tall"].shape == (RANK, 40) and bases["wide"].shape == (24, RANK)


def test_random_orthonormal_basis_is_orthonormal_and_uniform():
    """GoLore's basis: orthonormal to float32 round-off; Haar-uniform, so the projection of a
    fixed unit vector onto a random k-frame in R^n captures k/n of its energy on average
    (over 200 draws: within 5 standard errors)."""
    basis = _bases({"refresh": "random_orthonormal"})[0]["wide"]  # (24, k): left side
    np.testing.assert_allclose(basis.T @ basis, np.eye(RANK), atol=2e-6)
    e = np.zeros(24, np.float32)
    e[0] = 1.0
    draws = [
        fo._refresh.random_basis(24, RANK, jax.random.key(i), orthonormal=True) for i in range(200)
    ]
    captured = np.array([float(jnp.sum(jnp.square(b.T @ e))) for b in draws])
    se = captured.std() / np.sqrt(captured.size)
    assert abs(captured.mean() - RANK / 24) < 5 * se, (captured.mean(), RANK / 24)


@pytest.mark.parametrize(  # the fast tier runs each strategy in one of the two tests below
    "refresh", ["random", pytest.param("random_orthonormal", marks=pytest.mark.slow)]
)
def test_random_bases_are_new_at_every_refresh_per_leaf_and_seeded(refresh):
    runs = _bases({"refresh": refresh}, steps=2 * GAP + 1)
    first, same, second = runs[0], runs[GAP - 1], runs[GAP]
    for name in first:
        np.testing.assert_array_equal(first[name], same[name])  # no refresh in between
        assert not np.allclose(first[name], second[name]), name  # a new draw at step T+1
    assert not np.allclose(first["tall"][:, :8], first["wide"][:8].T)  # per leaf
    again = _bases({"refresh": refresh, "seed": 0})[0]
    other = _bases({"refresh": refresh, "seed": 1})[0]
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])  # the same compiled program
        assert not np.allclose(first[name], other[name]), name


def test_random_refresh_ignores_the_gradient_but_not_idleness():
    """A data-independent basis does not depend on the gradient's values; a matrix whose
    gradient is exactly zero keeps its basis (idle)."""
    ones = jax.tree.map(jnp.ones_like, PARAMS)
    twos = jax.tree.map(
        lambda p: 2.0 + jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), PARAMS
    )
    a = _bases({"refresh": "random"}, steps=1, grads=[ones])[0]
    b = _bases({"refresh": "random"}, steps=1, grads=[twos])[0]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    zero = {**ones, "wide": jnp.zeros_like(PARAMS["wide"])}
    c = _bases({"refresh": "random"}, steps=1, grads=[zero])[0]
    assert not np.any(c["wide"])  # idle: never refreshed, still the zeros of init


def test_callable_refresh_gets_the_matrix_and_its_context():
    """A user's strategy is called per matrix with the float32 gradient, the old basis, a
    key, k, the side, the leaf's path and the matrix's step count; its basis is used."""
    calls = []

    def injected(grad_mxn, basis, key, *, k, side, path, step):
        calls.append((grad_mxn.shape, basis.shape, k, side, path))
        scale = (step // GAP + 1).astype(jnp.float32)  # the refresh number, traced
        eye = jnp.eye(*basis.shape, dtype=jnp.float32)
        return scale * eye

    runs = _bases({"refresh": injected}, steps=GAP + 1)
    assert sorted(set(calls)) == [
        ((24, 80), (24, 8), 8, "left", "wide"),
        ((96, 40), (8, 40), 8, "right", "tall"),
    ]
    np.testing.assert_array_equal(runs[0]["tall"], np.eye(8, 40))
    np.testing.assert_array_equal(runs[GAP]["tall"], 2 * np.eye(8, 40))


def test_callable_refresh_with_a_wrong_shape_names_the_leaf():
    tx = fo.project(fo.ProjectionSpec(RANK), refresh=lambda g, b, key, **kw: jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"leaf 'tall', which needs \(8, 40\)"):
        tx.update(jax.tree.map(jnp.ones_like, PARAMS), tx.init(PARAMS))


@pytest.mark.parametrize("refresh", ["nope", 3, None])
def test_unknown_refresh_fails_at_construction(refresh):
    with pytest.raises(ValueError, match="random_orthonormal.*callable"):
        fo.fira(1e-2, RANK, refresh=refresh)


@pytest.mark.parametrize(
    "refresh", [pytest.param("random", marks=pytest.mark.slow), "random_orthonormal"]
)
def test_fira_trains_with_a_random_projection(refresh):
    """Least squares on a 64×32 matrix at rank 4, 300 steps: with a data-independent basis
    Fira (whose residual carries what the subspace misses) ends below 15 % of the starting
    loss and below GaLore with the same strategy (which drops that part)."""
    rng = np.random.default_rng(0)
    a, target = jnp.asarray(rng.normal(size=(128, 64))), jnp.asarray(rng.normal(size=(64, 32)))
    loss = lambda p: jnp.mean(jnp.square(a @ p["w"] - a @ target))

    def train(make):
        params = {"w": jnp.zeros((64, 32))}
        tx = make(3e-2, 4, update_proj_gap=10, refresh=refresh, projected={"w": True})
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(300):
            params, state = step(params, state)
        return float(loss(params))

    start = float(loss({"w": jnp.zeros((64, 32))}))
    fira, galore = train(fo.fira), train(fo.galore)
    assert fira < 0.15 * start and fira < galore, (fira, galore, start)


def test_refresher_is_chosen_at_construction():
    """Without layouts, on a one-device mesh, for a data-free strategy (no gradient moves to
    draw it) and for a callable (it runs where the gradient is) the refresh is local; the
    divided one needs a mesh of several devices and a strategy that reads the gradient."""
    from fira_optax import _distributed, _refresh

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    one_device = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))}
    for refresh, shardings in [
        ("svd", None),
        ("svd", one_device),
        ("randomized", one_device),
        ("random", {"w": "not even read"}),
        ("random_orthonormal", {"w": "not even read"}),
        (lambda g, b, key, **kw: b, {"w": "not even read"}),
    ]:
        chosen = _distributed.refresher(refresh, shardings)
        assert isinstance(chosen, _refresh.LocalRefresh), (refresh, shardings)
        assert chosen.refresh is refresh


def test_local_refresh_is_refresh_basis_with_the_shared_keys():
    """`LocalRefresh` draws each matrix's key with `matrix_keys` (the one derivation the
    divided refresh uses too) and keeps the basis where `refresh_if_due` says no: a stack of
    3 matrices, one not due and one idle."""
    import zlib

    from fira_optax import _refresh

    plan = fo.ProjectionSpec(4, projected={"w": True}).flat_plans({"w": jnp.zeros((3, 16, 8))})[0]
    grad = jax.random.normal(jax.random.key(1), (3, 16, 8)).at[2].set(0.0)
    basis = jnp.full(plan.basis_shape, 0.5, jnp.float32)
    step_key = jax.random.key(7)
    due = jnp.array([True, False, True])
    leaf = _refresh.RefreshLeaf(
        grad=grad,
        basis=basis,
        plan=plan,
        steps=jnp.zeros(3, jnp.int32),
        due=due,
        offset=None,
        keys=_refresh.matrix_keys(step_key, plan.batch_shape, plan.path),
    )
    (new,) = _refresh.LocalRefresh("randomized")([leaf])
    leaf_key = jax.random.fold_in(step_key, zlib.crc32(b"w") & 0x7FFFFFFF)
    direct = _refresh.refresh_basis(
        plan.view.to_matrix(grad), basis, plan.k, plan.side, leaf_key, "randomized", due
    )
    np.testing.assert_array_equal(np.asarray(new), np.asarray(direct))
    np.testing.assert_array_equal(np.asarray(new[1:]), np.asarray(basis[1:]))
    assert not np.allclose(np.asarray(new[0]), 0.5)
