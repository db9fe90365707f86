"""Bad input fails early (construction or init) with a clear ValueError naming the problem."""

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
