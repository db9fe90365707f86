"""Bad input and misuse fail early (construction, init or trace time) with a clear error that
names the problem and the fix: bad hyper-parameters, structural arguments traced under
`optax.inject_hyperparams`, misordered blocks, a forgotten `project_back` under `jit`, integer
leaves selected for projection; and the hyper-parameters as users pass them (NumPy / JAX
scalars, `inject_hyperparams`). Faults at run time (spikes, idle matrices): `test_faults.py`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
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
        # As configs pass them: NumPy / JAX scalars, bools, floats where an integer goes.
        (dict(rank=4, update_proj_gap=2**31), "update_proj_gap must be at most"),
        (dict(rank=4, update_proj_gap=np.int64(0)), "update_proj_gap must be positive"),
        (dict(rank=4, update_proj_gap=2.0), "update_proj_gap must be a positive integer"),
        (dict(rank=np.float32(4.0)), "rank must be a positive integer"),
        (dict(rank=True), "rank must be a positive integer"),
        (dict(rank=4, scale=-1.0), "scale must be a finite number > 0"),
        (dict(rank=4, scale=0.0), "scale must be a finite number > 0"),
        (dict(rank=4, scale=float("nan")), "scale must be a finite number > 0"),
        (dict(rank=4, scale=float("inf")), "scale must be a finite number > 0"),
        (dict(rank=4, scale=np.float32(-0.5)), "scale must be a finite number > 0"),
        (dict(rank=4, scale=jnp.asarray(-0.5)), "scale must be a finite number > 0"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(1e-2, **kwargs)


@pytest.mark.parametrize("gamma", [0.99, jnp.asarray(0.5), float("nan")], ids=str)
def test_gamma_below_one_fails(gamma):
    with pytest.raises(ValueError, match="gamma must be a finite number >= 1"):
        fo.fira(1e-2, 4, gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 1"):
        fo.limit_norm_growth(gamma=0.5)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 1"):
        fo.limit_norm_growth(fo.ProjectionSpec(4), 0.5)


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
        fo.project(fo.ProjectionSpec(rank=4), update_proj_gap=10),
        fo.scale_by_low_rank_adam(fo.ProjectionSpec(rank=2)),
        fo.project_back(),
    )
    state = chain.init(PARAMS)
    with pytest.raises(ValueError, match=r"leaf 'attn/q'.*the spec given to project\(\)"):
        jax.jit(chain.update)(PARAMS, state)


def test_chain_with_mismatched_projected_fails_naming_the_leaf():
    chain = optax.chain(
        fo.project(
            fo.ProjectionSpec(4, projected=lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
        ),
        fo.scale_by_low_rank_adam(
            fo.ProjectionSpec(4, projected=lambda p: jax.tree.map(lambda x: False, p))
        ),
        fo.project_back(),
    )
    with pytest.raises(ValueError, match=r"'attn/q' receives a low-rank gradient"):
        chain.update(PARAMS, chain.init(PARAMS))


def test_limiter_without_residual_fails():
    chain = optax.chain(
        fo.project(fo.ProjectionSpec(rank=4)),
        fo.scale_by_low_rank_adam(fo.ProjectionSpec(rank=4)),
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
# Hyper-parameters as users pass them (YAML / NumPy configs, inject_hyperparams).


@pytest.mark.parametrize("rank", [np.int64(8), np.int32(8), jnp.int32(8), 8])
def test_integer_like_rank_and_gap(rank):
    """NumPy / JAX integers pass as Python integers."""
    tx = fo.fira(1e-2, rank, update_proj_gap=np.int64(5))
    params = {"w": jnp.ones((32, 16))}
    state = tx.init(params)
    assert optax.tree_utils.tree_get(state, "bases")["w"].shape == (8, 16)
    spec = fo.ProjectionSpec(rank)
    assert type(spec.rank) is int and spec.rank == 8


def test_traced_hyperparameters_are_not_checked():
    """Under inject_hyperparams inside jit, scale/gamma are tracers: no check, no error."""
    tx = optax.inject_hyperparams(fo.fira, static_args=("rank", "update_proj_gap"))(
        learning_rate=1e-2, rank=4, scale=0.5, gamma=1.02
    )
    params = {"w": jnp.ones((16, 8)) + jnp.eye(16, 8)}
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("factory", [fo.fira, fo.galore])
def test_inject_hyperparams_without_params(factory):
    """weight_decay left at its default: no params needed (it was an injected 0.0 array)."""
    tx = optax.inject_hyperparams(factory, static_args=("rank", "update_proj_gap"))(
        learning_rate=1e-2, rank=8
    )
    params = {"w": jax.random.normal(jax.random.key(0), (32, 16)), "b": jnp.ones(16)}
    state = tx.init(params)
    for _ in range(2):
        updates, state = jax.jit(tx.update)(params, state)
    chex.assert_tree_all_finite(updates)
    # With a (traced) weight decay the error names the fix.
    tx = optax.inject_hyperparams(factory, static_args=("rank", "update_proj_gap"))(
        learning_rate=1e-2, rank=8, weight_decay=0.0
    )
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(tx.update)(params, tx.init(params))
    # Listed as static, a zero weight decay needs no params.
    tx = optax.inject_hyperparams(factory, static_args=("rank", "update_proj_gap", "weight_decay"))(
        learning_rate=1e-2, rank=8, weight_decay=0.0
    )
    jax.jit(tx.update)(params, tx.init(params))


# ----------------------------------------------------------------------------------------------
# The fira_optax blocks in the wrong order.


def _misordered(*middle):
    spec = fo.ProjectionSpec(4)
    blocks = {
        "adam": fo.scale_by_low_rank_adam(spec),
        "in_subspace": fo.in_subspace(spec, optax.scale_by_rms()),
        "residual": fo.norm_scale_residual(),
        "limiter": fo.limit_norm_growth(spec),
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
    spec = fo.ProjectionSpec(4)
    tx = optax.chain(fo.project(spec), fo.scale_by_low_rank_adam(spec))
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
    spec = fo.ProjectionSpec(rank=4)
    assert fo.projected_mask(INT_PARAMS, spec) == {"w": True, "steps": False, "flags": False}
    table = fo.describe_projection(INT_PARAMS, spec)
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
        fo.projected_mask(INT_PARAMS, fo.ProjectionSpec(4, projected=projected))


@pytest.mark.parametrize("spec", [4, jnp.int32(4)])
def test_project_given_a_rank_instead_of_a_spec_names_the_spec(spec):
    with pytest.raises(TypeError, match=r"fo\.ProjectionSpec\(rank=4\)"):
        fo.project(spec)


@pytest.mark.parametrize("keyword", ["rank", "proj_type", "projected", "dimension_numbers"])
def test_project_takes_the_projection_only_as_a_spec(keyword):
    with pytest.raises(TypeError, match=keyword):
        fo.project(fo.ProjectionSpec(4), **{keyword: None})
    with pytest.raises(TypeError, match=r"fo\.ProjectionSpec\(rank=\.\.\.\)"):
        fo.project("std")


# ----------------------------------------------------------------------------------------------
# The projection is given to a block as a ProjectionSpec, and only so.


@pytest.mark.parametrize(
    "block",
    [
        lambda spec: fo.scale_by_low_rank_adam(spec),
        lambda spec: fo.in_subspace(spec, optax.scale_by_rms()),
        lambda spec: fo.limit_norm_growth(spec),
        lambda spec: fo.describe_projection(PARAMS, spec),
        lambda spec: fo.projected_mask(PARAMS, spec),
    ],
    ids=["scale_by_low_rank_adam", "in_subspace", "limit_norm_growth", "describe", "mask"],
)
@pytest.mark.parametrize("rank", [4, jnp.int32(4)], ids=["int", "jax"])
def test_a_rank_where_the_spec_goes_names_projection_spec(block, rank):
    with pytest.raises(TypeError, match=r"pass fo\.ProjectionSpec\(rank=4\)"):
        block(rank)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fo.scale_by_low_rank_adam(rank=4),
        lambda: fo.scale_by_low_rank_adam(fo.ProjectionSpec(4), spec=fo.ProjectionSpec(4)),
        lambda: fo.in_subspace(optax.scale_by_rms(), rank=4),
        lambda: fo.limit_norm_growth(projected={"attn": {"q": True}}),
        lambda: fo.projected_mask(PARAMS, rank=4),
        lambda: fo.describe_projection(PARAMS, rank=4),
    ],
    ids=["adam_rank", "adam_twice", "in_subspace_rank", "limiter_projected", "mask", "describe"],
)
def test_projection_keywords_on_a_block_fail(make):
    with pytest.raises(TypeError, match="unexpected keyword argument|multiple values"):
        make()


def test_a_block_without_its_spec_names_projection_spec():
    with pytest.raises(TypeError, match=r"spec=fo\.ProjectionSpec\(rank=\.\.\.\)"):
        fo.scale_by_low_rank_adam(None)
    with pytest.raises(TypeError, match=r"the spec first.*limit_norm_growth\(fo\.ProjectionSpec"):
        fo.limit_norm_growth(1.05)
    with pytest.raises(TypeError, match=r"in_subspace\(spec, base_optimizer\)"):
        fo.in_subspace(fo.ProjectionSpec(4), "adam")
    with pytest.raises(ValueError, match=r"the spec needs a rank"):
        fo.scale_by_low_rank_adam(fo.ProjectionSpec(None))


def test_literal_option_types_list_the_checked_values():
    """The `Literal` types of the signatures are the values the blocks accept."""
    from typing import get_args

    from fira_optax import _refresh, _residual, _schedule, _shapes, _subspace, _types

    assert get_args(_types.ProjType) == _shapes.PROJ_TYPES
    assert get_args(_types.RefreshMethod) == _refresh.REFRESH_METHODS
    assert get_args(_types.RefreshSchedule) == _schedule.SCHEDULES
    assert get_args(_types.OnRefresh) == _subspace.ON_REFRESH
    assert get_args(_types.BiasCorrection) == _subspace.BIAS_CORRECTIONS
    assert get_args(_types.ScaleType) == _residual.SCALE_TYPES
    assert get_args(_types.StateFreeRule) == _residual.STATE_FREE_RULES
