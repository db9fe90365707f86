"""The node region between `project` and `project_back` is guarded.

A plain optax transform placed there either acts as it would on the dense leaves at that place
(scalar scaling: before the subspace optimizer it scales the gradient, after it the update,
exactly) or fails at trace time with a message naming the block order; a `LowRankUpdate` that
reaches `apply_updates` (a forgotten `project_back`) fails naming `project_back`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import fira_optax as fo

PARAMS = {"w": jax.random.normal(jax.random.key(0), (24, 12)), "b": jnp.arange(12.0) + 1}


def blocks(residual=True):
    spec = fo.ProjectionSpec(4)
    out = [
        fo.project(spec=spec, update_proj_gap=2, scale=0.5),
        fo.scale_by_low_rank_adam(spec=spec),
    ]
    if residual:
        out += [fo.norm_scale_residual(), fo.limit_norm_growth(spec=spec)]
    return out + [fo.project_back()]


def run(tx, steps=3):
    state, out = tx.init(PARAMS), []
    for t in range(steps):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1.0)), PARAMS)
        updates, state = jax.jit(tx.update)(grads, state, PARAMS)
        out.append(updates)
    return out


@pytest.mark.parametrize("residual", [True, False], ids=["fira", "galore"])
@pytest.mark.parametrize(
    "middle",
    [optax.scale(2.0), optax.scale_by_learning_rate(-2.0), optax.scale_by_schedule(lambda c: 2.0)],
    ids=["scale", "scale_by_learning_rate", "scale_by_schedule"],
)
def test_scalar_scaling_inside_acts_as_on_dense_leaves(middle, residual):
    base = run(optax.chain(*blocks(residual)))
    n_blocks = len(blocks(residual))
    for position in range(1, n_blocks):
        chain = blocks(residual)
        chain.insert(position, middle)
        got = run(optax.chain(*chain))
        if position == 1:  # before the subspace optimizer: the gradient is scaled by 2
            want = run(optax.chain(optax.scale(2.0), *blocks(residual)))
        else:  # after it: the update is scaled by 2, exactly
            want = [jax.tree.map(lambda u: 2.0 * u, x) for x in base]
        chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize(
    "middle, what",
    [
        (optax.clip_by_global_norm(1.0), "array attribute"),
        (optax.clip(1.0), "move this transform after fo.project_back"),
        (optax.add_decayed_weights(1e-2), "used in `\\+`"),
        (optax.trace(0.9), "used in `\\+`"),
        (optax.scale_by_adam(), "used in `\\*\\*`"),
    ],
    ids=["clip_by_global_norm", "clip", "add_decayed_weights", "trace", "scale_by_adam"],
)
def test_other_transforms_inside_fail_at_trace_time_naming_the_order(middle, what):
    chain = blocks()
    chain.insert(2, middle)
    tx = optax.chain(*chain)
    with pytest.raises((TypeError, AttributeError), match=what) as info:
        jax.jit(tx.update).trace(PARAMS, tx.init(PARAMS), PARAMS)
    assert "project_back" in str(info.value)


def test_forgotten_project_back_fails_in_apply_updates():
    tx = optax.chain(*blocks()[:-1])
    updates, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    with pytest.raises(TypeError, match=r"leaf 'w'.*forget fo.project_back\(\)"):
        optax.apply_updates(PARAMS, updates)
    tx = optax.chain(*blocks()[:-1], optax.scale_by_learning_rate(1e-2))  # scaling is fine...
    with pytest.raises(TypeError, match="project_back"):  # ... but the update is not dense
        jax.jit(lambda p, s: optax.apply_updates(p, tx.update(p, s, p)[0]))(PARAMS, tx.init(PARAMS))


def test_forgotten_project_back_fails_in_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(24, 12, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(*blocks()[:-1]), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    with pytest.raises(TypeError, match="project_back"):
        optimizer.update(model, grads)


def test_node_repr_is_short_and_says_what_to_do():
    tx = optax.chain(fo.project(4))
    nodes, _ = tx.update(PARAMS, tx.init(PARAMS))
    text = repr(nodes["w"])
    assert len(text) < 300 and "project_back" in text and "'w'" in text
