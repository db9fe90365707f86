"""Bad input and misuse fail early (construction, init or trace time) with a clear error that
names the problem and the fix: bad hyper-parameters, structural arguments traced under
`optax.inject_hyperparams`, misordered blocks, a forgotten `project_back` under `jit`, integer
leaves selected for projection; and what an overflowing gradient spike does, with its guard."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import fira_optax as fo

PARAMS = {"attn": {"q": jnp.ones((8, 6))}, "norm": {"scale": jnp.ones(6)}}


@pytest.mark.parametrize("factory", [fo.fira, fo.galore])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be positive"),
        (dict(rank=-3), "rank must be positive"),
        (dict(rank=2.5), "rank must be a positive integer"),
        (dict(rank=4, proj_type="diagonal"), "Unknown proj_type 'diagonal'"),
        (dict(rank=4, proj_type="full"), "proj_type='full'"),
        (dict(rank=4, update_proj_gap=0), "update_proj_gap must be positive"),
        (dict(rank=4, refresh="qr"), "Unknown refresh 'qr'"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(1e-2, **kwargs)


def test_gamma_below_one_fails():
    with pytest.raises(ValueError, match="gamma must be a finite number >= 1"):
        fo.fira(1e-2, 4, gamma=0.99)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 1"):
        fo.limit_norm_growth(gamma=0.5)


def test_one_dimensional_leaf_selected_as_projected_names_the_leaf():
    tx = fo.fira(1e-2, 4, projected={"attn": {"q": True}, "norm": {"scale": True}})
    with pytest.raises(ValueError, match=r"leaf 'norm/scale' has shape \(6,\)"):
        tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"'norm/scale'"):
        fo.fira(1e-2, 4, projected="scale").init(PARAMS)


def test_mask_tree_that_does_not_match_params():
    tx = fo.fira(1e-2, 4, projected={"attn": {"q": True}})
    with pytest.raises(ValueError, match="mask tree does not match the params tree"):
        tx.init(PARAMS)
    with pytest.raises(ValueError, match="mask tree does not match"):
        fo.galore(1e-2, 4, projected=lambda p: [True]).init(PARAMS)


def test_chain_with_mismatched_rank_fails_at_trace_time_naming_the_leaf():
    chain = optax.chain(
        fo.project(rank=4, update_proj_gap=10),
        fo.scale_by_low_rank_adam(rank=2),
        fo.project_back(),
    )
    state = chain.init(PARAMS)
    with pytest.raises(
        ValueError, match=r"leaf 'attn/q'.*same spec.*same rank, proj_type, projected"
    ):
        jax.jit(chain.update)(PARAMS, state)


def test_chain_with_mismatched_projected_fails_naming_the_leaf():
    chain = optax.chain(
        fo.project(rank=4, projected=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
        fo.scale_by_low_rank_adam(rank=4, projected=lambda p: jax.tree.map(lambda x: False, p)),
        fo.project_back(),
    )
    with pytest.raises(ValueError, match=r"'attn/q' receives a low-rank gradient"):
        chain.update(PARAMS, chain.init(PARAMS))


def test_limiter_without_residual_fails():
    chain = optax.chain(
        fo.project(rank=4),
        fo.scale_by_low_rank_adam(rank=4),
        fo.limit_norm_growth(),
        fo.project_back(),
    )
    with pytest.raises(ValueError, match="put norm_scale_residual"):
        chain.update(PARAMS, chain.init(PARAMS))


def test_state_from_other_params_fails_naming_the_leaf():
    tx = fo.fira(1e-2, 4)
    state = tx.init(PARAMS)
    other = {"attn": {"q": jnp.ones((8, 10))}, "norm": {"scale": jnp.ones(6)}}
    with pytest.raises(ValueError, match=r"'attn/q'"):
        tx.update(other, state, other)


def test_weight_decay_without_params_fails():
    tx = fo.fira(1e-2, 4, weight_decay=0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(PARAMS, tx.init(PARAMS))


# ----------------------------------------------------------------------------------------------
# Structural hyper-parameters under optax.inject_hyperparams.


@pytest.mark.parametrize(
    "static_args, traced",
    [((), "rank"), (("rank",), "update_proj_gap")],
    ids=["nothing_static", "rank_static"],
)
def test_traced_structural_argument_names_static_args(static_args, traced):
    tx = optax.inject_hyperparams(fo.fira, static_args=static_args)(learning_rate=1e-2, rank=4)
    state = tx.init(PARAMS)
    with pytest.raises(
        ValueError,
        match=rf"^{traced} sets array shapes.*static_args=\('rank', 'update_proj_gap'\)",
    ):
        jax.jit(tx.update)(PARAMS, state, PARAMS)


def test_inject_hyperparams_with_the_structural_arguments_static_works_under_jit():
    tx = optax.inject_hyperparams(fo.fira, static_args=("rank", "update_proj_gap"))(
        learning_rate=1e-2, rank=4, refresh_schedule="staggered"
    )
    state = tx.init(PARAMS)
    updates, state = jax.jit(tx.update)(PARAMS, state, PARAMS)
    assert updates["attn"]["q"].shape == (8, 6)
    assert {"learning_rate", "scale", "gamma", "b1", "b2", "eps"} <= set(state.hyperparams)


def test_projected_function_taken_for_a_schedule_names_static_args():
    tx = optax.inject_hyperparams(fo.fira, static_args=("rank", "update_proj_gap"))(
        learning_rate=1e-2, rank=4, projected=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
    )
    with pytest.raises(ValueError, match=r"list 'projected' in static_args"):
        tx.init(PARAMS)


# ----------------------------------------------------------------------------------------------
# The fira_optax blocks in the wrong order.


def _misordered(*middle):
    spec = fo.ProjectionSpec(4)
    blocks = {
        "adam": fo.scale_by_low_rank_adam(spec=spec),
        "in_subspace": fo.in_subspace(optax.scale_by_rms(), spec=spec),
        "residual": fo.norm_scale_residual(),
        "limiter": fo.limit_norm_growth(spec=spec),
    }
    return optax.chain(fo.project(spec=spec), *(blocks[b] for b in middle), fo.project_back())


@pytest.mark.parametrize(
    "middle, block, fix",
    [
        (("residual", "adam"), "norm_scale_residual", "no direction yet: put norm_scale_residual"),
        (("residual",), "norm_scale_residual", "no direction yet: put norm_scale_residual"),
        (
            ("adam", "residual", "residual"),
            "norm_scale_residual",
            "put norm_scale_residual\\(\\) once",
        ),
        (("adam", "residual", "limiter", "residual"), "norm_scale_residual", "once"),
        (("adam", "adam"), "scale_by_low_rank_adam", "already carries a direction"),
        (("adam", "in_subspace"), "in_subspace", "already carries a direction"),
        (("in_subspace", "adam"), "scale_by_low_rank_adam", "already carries a direction"),
        (("adam", "residual", "in_subspace"), "in_subspace", "already carries a direction"),
    ],
    ids=[
        "residual_before_adam",
        "residual_without_optimizer",
        "residual_twice",
        "residual_after_limiter",
        "adam_twice",
        "in_subspace_after_adam",
        "adam_after_in_subspace",
        "in_subspace_after_residual",
    ],
)
def test_misordered_blocks_fail_at_trace_time_naming_the_order(middle, block, fix):
    tx = _misordered(*middle)
    with pytest.raises(ValueError, match=rf"^{block}: leaf 'attn/q' .*{fix}") as info:
        jax.jit(tx.update).trace(PARAMS, tx.init(PARAMS), PARAMS)
    assert "Keep the order project → subspace optimizer" in str(info.value)


def test_limiter_before_residual_still_names_the_fix():
    tx = _misordered("adam", "limiter", "residual")
    with pytest.raises(ValueError, match="put norm_scale_residual\\(\\) before limit_norm_growth"):
        jax.jit(tx.update).trace(PARAMS, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize(
    "middle", [("adam",), ("in_subspace",), ("adam", "residual"), ("adam", "residual", "limiter")]
)
def test_well_ordered_blocks_pass(middle):
    tx = _misordered(*middle)
    updates, _ = jax.jit(tx.update)(PARAMS, tx.init(PARAMS), PARAMS)
    assert updates["attn"]["q"].shape == (8, 6)


# ----------------------------------------------------------------------------------------------
# A forgotten project_back under jit.


def test_forgotten_project_back_under_jit_names_the_leaf_and_project_back():
    tx = optax.chain(fo.project(4), fo.scale_by_low_rank_adam(rank=4))
    state = tx.init(PARAMS)
    with pytest.raises(
        TypeError,
        match=r"LowRankUpdate \(a projected leaf.*forget fo\.project_back\(\).*"
        r"at output component \[0\]\['attn'\]\['q'\]",
    ):
        jax.jit(tx.update)(PARAMS, state, PARAMS)


def test_node_class_repr_is_the_usual_one():
    assert repr(fo.LowRankUpdate) == "<class 'fira_optax._node.LowRankUpdate'>"


# ----------------------------------------------------------------------------------------------
# Integer and bool leaves.

INT_PARAMS = {
    "w": jnp.ones((64, 32)),
    "steps": jnp.zeros((64, 32), jnp.int32),
    "flags": jnp.zeros((64, 32), bool),
}


def test_integer_and_bool_leaves_are_not_projected_by_default():
    assert fo.projected_mask(INT_PARAMS, rank=4) == {"w": True, "steps": False, "flags": False}
    table = fo.describe_projection(INT_PARAMS, rank=4)
    assert "1 of 3 leaves projected" in table
    tx = fo.fira(1e-2, 4)
    state = tx.init(INT_PARAMS)
    grads = {"w": jnp.ones((64, 32)), "steps": INT_PARAMS["steps"], "flags": INT_PARAMS["flags"]}
    updates, _ = jax.jit(tx.update)(grads, state, INT_PARAMS)
    assert bool(jnp.isfinite(updates["w"]).all())


@pytest.mark.parametrize("leaf, dtype", [("steps", "int32"), ("flags", "bool")])
def test_forcing_an_integer_or_bool_leaf_fails_at_init_naming_leaf_and_dtype(leaf, dtype):
    projected = {"w": True, "steps": False, "flags": False, leaf: True}
    with pytest.raises(ValueError, match=rf"leaf '{leaf}' has dtype {dtype}.*floating-point"):
        fo.fira(1e-2, 4, projected=projected).init(INT_PARAMS)
    with pytest.raises(ValueError, match=rf"leaf '{leaf}' has dtype {dtype}"):
        fo.projected_mask(INT_PARAMS, projected)


# ----------------------------------------------------------------------------------------------
# A gradient spike whose square overflows float32, unguarded and guarded.


def _spike_run(tx, dtype, spike_grad):
    params = {"w": jnp.ones((64, 256), dtype), "b": jnp.ones(64, dtype)}
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for t in range(6):
        key = jax.random.key(t)
        grads = jax.tree.map(lambda p, key=key: jax.random.normal(key, p.shape), params)
        if t == 1:
            grads = spike_grad(grads)
        grads = jax.tree.map(lambda g: g.astype(dtype), grads)
        updates, state = update(grads, state, params)
        out.append(updates)
    return out, state


def _guarded():
    return optax.chain(optax.clip_by_global_norm(1.0), fo.fira(1e-2, 8, update_proj_gap=10))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overflowing_spike_zeroes_the_matrix_for_good_and_clipping_guards_it(dtype):
    spike = lambda g: jax.tree.map(lambda x: 1e30 * x, g)
    # Unguarded: Adam's second moment overflows to inf, so every later update of the matrix
    # (and of the dense leaf) is exactly zero and finite — apply_if_finite skips nothing.
    tx = optax.apply_if_finite(fo.fira(1e-2, 8, update_proj_gap=10), max_consecutive_errors=3)
    out, state = _spike_run(tx, dtype, spike)
    assert int(state.total_notfinite) == 0
    for updates in out[2:]:
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    is_adam = lambda x: isinstance(x, fo.LowRankAdamState)
    (adam,) = [s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)]
    assert bool(jnp.isinf(adam.nu["w"]).all()) and bool(jnp.isinf(adam.nu["b"]).all())
    # Guarded: clip_by_global_norm turns the spike (its global norm overflows) into an exactly
    # zero gradient, and training goes on as after a zero-gradient step.
    clipped, _ = _spike_run(_guarded(), dtype, spike)
    zeroed, _ = _spike_run(_guarded(), dtype, lambda g: jax.tree.map(jnp.zeros_like, g))
    chex.assert_trees_all_equal(clipped, zeroed)
    for updates in clipped[2:]:
        assert float(jnp.abs(updates["w"].astype(jnp.float32)).mean()) > 1e-4
