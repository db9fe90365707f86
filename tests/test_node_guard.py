"""The node region between `project` and `project_back` is guarded.

A plain optax transform placed there either acts as it would on the dense leaves at that place
(scalar scaling: before the subspace optimizer it scales the gradient, after it the update) or
fails at trace time with a message naming the block order; a `LowRankUpdate` that reaches
`apply_updates` (a forgotten `project_back`) fails naming `project_back`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from _roundoff import ROUND_OFF, assert_round_off

import fira_optax as fo

PARAMS = {"w": jax.random.normal(jax.random.key(0), (24, 12)), "b": jnp.arange(12.0) + 1}


def blocks(residual=True):
    spec = fo.ProjectionSpec(4)
    out = [
        fo.project(spec=spec, update_proj_gap=2, scale=0.5),
        fo.scale_by_low_rank_adam(spec),
    ]
    if residual:
        out += [fo.norm_scale_residual(), fo.limit_norm_growth(spec)]
    return out + [fo.project_back()]


def grads(t):
    return jax.tree.map(lambda p: jnp.sin(p * (t + 1.0)), PARAMS)


def run(tx, steps=3, jit=True):
    update = jax.jit(tx.update) if jit else tx.update
    state, out = tx.init(PARAMS), []
    for t in range(steps):
        updates, state = update(grads(t), state, PARAMS)
        out.append(updates)
    return out


@pytest.mark.parametrize("residual", [True, False], ids=["fira", "galore"])
@pytest.mark.parametrize(
    "middle",
    [  # the fast tier: `optax.scale`; the other two scalings are slow
        optax.scale(2.0),
        pytest.param(optax.scale_by_learning_rate(-2.0), marks=pytest.mark.slow),
        pytest.param(optax.scale_by_schedule(lambda c: 2.0), marks=pytest.mark.slow),
    ],
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
        else:  # after it: the update is scaled by 2
            want = [jax.tree.map(lambda u: 2.0 * u, x) for x in base]
        # Two differently built chains, jitted: different programs (where the ×2 lands changes
        # fusion and summation order), equal to a few ulps (measured ≤ 1.0e-7 of the leaf's
        # largest entry; the bound is ≥ 5e5× below a factor-2 error or a missing scale). The
        # exact statement, op by op, is the next test.
        assert_round_off(got, want, ROUND_OFF, f"position {position}")


@pytest.mark.parametrize("residual", [True, False], ids=["fira", "galore"])
def test_scalar_scaling_inside_is_exact_op_by_op(residual):
    """Bitwise, where it holds by construction: without jit every op runs as its own
    computation (equal inputs give equal bits), and a factor 2 passes through float32
    products, sums and matmuls exactly. After the subspace optimizer only the node's step
    scale is doubled, so the dense update is exactly 2× the unscaled one; before it, the
    node's G and R are exactly 2× (and the basis unchanged: the refresh saw the unscaled G)."""
    eager = run(optax.chain(*blocks(residual)), jit=False)
    for position in range(2, len(blocks(residual))):
        chain = blocks(residual)
        chain.insert(position, optax.scale(2.0))
        got = run(optax.chain(*chain), jit=False)
        chex.assert_trees_all_equal(got, [jax.tree.map(lambda u: 2.0 * u, x) for x in eager])
    spec = fo.ProjectionSpec(4)
    project = fo.project(spec=spec, update_proj_gap=2, scale=0.5)
    scaled = optax.chain(project, optax.scale(2.0))
    plain, _ = project.update(grads(0), project.init(PARAMS), PARAMS)
    node, _ = scaled.update(grads(0), scaled.init(PARAMS), PARAMS)
    u, v = plain["w"], node["w"]
    chex.assert_trees_all_equal(v.basis, u.basis)
    chex.assert_trees_all_equal((v.grad, v.low_rank), (2.0 * u.grad, 2.0 * u.low_rank))
    chex.assert_trees_all_equal(node["b"], 2.0 * plain["b"])


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
    tx = optax.chain(fo.project(fo.ProjectionSpec(4)))
    nodes, _ = tx.update(PARAMS, tx.init(PARAMS))
    text = repr(nodes["w"])
    assert len(text) < 300 and "project_back" in text and "'w'" in text
