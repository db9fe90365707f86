"""The optax contract, over every optimizer and the building-block chain.

Ported from the idea of optax's `contrib/_common_test.py`: no retrace, extra args,
`inject_hyperparams`, `MultiSteps`, dtype preservation, `map_params`, schedules, empty trees;
`chex.variants` runs the blocks and aliases with and without jit.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import OPTIMIZERS, block_chain
from _roundoff import ROUND_OFF, assert_round_off

import fira_optax as fo
from fira_optax._testing import matrix_problem


def _fast_tier(*fast):
    """Every optimizer; those not in `fast` are `slow` (not in `pytest -m "not slow"`)."""
    return [
        pytest.param(name, marks=() if name in fast else pytest.mark.slow)
        for name in sorted(OPTIMIZERS)
    ]


# The fast tier runs the contracts on Fira and the block chain; those whose code path does not
# depend on how the chain is assembled on Fira alone (the block chain is the same computation:
# `test_block_chain_equals_scale_by_fira`).
NAMES = _fast_tier("fira", "blocks")
FAST_FIRA = _fast_tier("fira")


def _step_fn(opt, loss_fn, **update_kwargs):
    chex.clear_trace_counter()  # the counter is keyed by the function's code location

    @jax.jit
    @chex.assert_max_traces(n=1)  # refresh and non-refresh steps share one executable
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, **update_kwargs)
        return optax.apply_updates(params, updates), state, loss

    return step


@pytest.mark.parametrize("name", NAMES)
def test_converges_without_retrace(name):
    opt = OPTIMIZERS[name]()
    params, loss_fn = matrix_problem()
    state = opt.init(params)
    step = _step_fn(opt, loss_fn)
    losses = []
    for _ in range(60):  # 12 refreshes
        params, state, loss = step(params, state)
        losses.append(float(loss))
    chex.assert_tree_all_finite(losses)
    # GaLore (α = 0.25, rank 4) trains only inside the subspace: it is expected to be
    # slower; GoLore too, and its random subspaces (after 5 steps) capture less of it.
    target = {"galore": 0.9, "golore": 0.95}.get(name, 0.35)
    assert losses[-1] < target * losses[0], losses[::10]


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_are_accepted(name):
    opt = OPTIMIZERS[name]()
    params, loss_fn = matrix_problem()
    state = opt.init(params)
    step = _step_fn(opt, loss_fn, unexpected_extra_arg_your_optimizer_doesnt_expect=1)
    params, state, _ = step(params, state)
    params, state, _ = step(params, state)
    chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("name", ["fira", pytest.param("galore", marks=pytest.mark.slow)])
def test_inject_hyperparams(name):
    factory = {"fira": fo.fira, "galore": fo.galore}[name]
    kwargs = dict(learning_rate=1e-2, rank=4, update_proj_gap=3, scale=0.5, weight_decay=0.1)
    opt = factory(**kwargs)
    opt_inject = optax.inject_hyperparams(factory, static_args=("rank", "update_proj_gap"))(
        **kwargs
    )
    params, loss_fn = matrix_problem(seed=1)
    state, state_inject = opt.init(params), opt_inject.init(params)
    p1, p2 = params, params
    for _ in range(5):
        g1, g2 = jax.grad(loss_fn)(p1), jax.grad(loss_fn)(p2)
        u1, state = jax.jit(opt.update)(g1, state, p1)
        u2, state_inject = jax.jit(opt_inject.update)(g2, state_inject, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    # Traced vs constant hyper-parameters: different programs, float32 round-off over 5 steps
    # (measured ≤ 1.3e-7 of the largest weight, ≤ 1/40 of these bounds, under SSE4.2, AVX2
    # and AVX-512 code).
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)
    assert float(state_inject.hyperparams["scale"]) == 0.5
    # A hyper-parameter changed at run time takes effect without retracing.
    state_inject.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = jax.jit(opt_inject.update)(jax.grad(loss_fn)(p2), state_inject, p2)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", FAST_FIRA)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserves_dtype(name, dtype):
    opt = OPTIMIZERS[name]()
    params, loss_fn = matrix_problem(jnp.dtype(dtype))
    state = jax.jit(opt.init)(params)
    grads = jax.grad(loss_fn)(params)
    updates, new_state = jax.jit(opt.update)(grads, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    # The state's shapes and dtypes are stable across an update (so lax.cond/scan work).
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps(name):
    opt = optax.MultiSteps(OPTIMIZERS[name](), every_k_schedule=3)
    params, loss_fn = matrix_problem()
    state = jax.jit(opt.init)(params)
    update = jax.jit(opt.update)
    for i in range(6):
        updates, state = update(jax.grad(loss_fn)(params), state, params)
        zero = all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(updates))
        assert zero == (i % 3 != 2)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", FAST_FIRA)
def test_map_params(name):
    opt = OPTIMIZERS[name]()
    params, loss_fn = matrix_problem()
    state = opt.init(params)
    mapped = optax.tree.map_params(opt, lambda v: v, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    updates, _ = opt.update(jax.grad(loss_fn)(params), mapped, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_schedules_for_learning_rate_and_weight_decay():
    lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, 1e-3)
    wd = optax.linear_schedule(0.1, 0.0, 10)
    params, loss_fn = matrix_problem()
    opt = fo.fira(lr, rank=4, update_proj_gap=4, weight_decay=wd)
    const = fo.fira(0.0, rank=4, update_proj_gap=4, weight_decay=0.1)
    state = opt.init(params)
    # Step 0 of the schedule has lr 0: the first update is exactly zero.
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    updates, _ = opt.update(jax.grad(loss_fn)(params), state, params)
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
    updates, _ = const.update(jax.grad(loss_fn)(params), const.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_empty_tree(name):
    opt = OPTIMIZERS[name]()
    state = opt.init({})
    updates, state = jax.jit(opt.update)({}, state, {})
    assert updates == {}


def test_state_is_stable_under_lax_cond():
    """The state is a `lax.cond` operand: both branches have one structure, shapes and dtypes;
    the false branch keeps the state bit for bit, the true branch is the plain jitted update's
    state (another program: float32 round-off), refresh steps included."""
    opt = fo.fira(1e-2, rank=4, update_proj_gap=2)
    params, loss_fn = matrix_problem()
    state = opt.init(params)
    grads = jax.grad(loss_fn)(params)

    @jax.jit
    def step(state, flip):
        _, new_state = opt.update(grads, state, params)
        return jax.lax.cond(flip, lambda: new_state, lambda: state)

    plain = jax.jit(lambda state: opt.update(grads, state, params)[1])
    flips = (True, False, True, True, False)  # refreshes at counts 0 and 2
    for t, flip in enumerate(flips):
        out = step(state, flip)
        chex.assert_trees_all_equal_structs(out, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, state)
        if flip:
            assert_round_off(out, plain(state), ROUND_OFF, f"cond(True) at step {t + 1}")
        else:
            chex.assert_trees_all_equal(out, state)
        state = out
    counts = optax.tree_utils.tree_get_all_with_path(state, "count")
    assert counts and all(int(count) == sum(flips) for _, count in counts), counts


def test_weight_decay_is_applied_after_the_step_on_updated_weights():
    """W ← W − lr·u, then W ← W − lr·wd·W (the official order), on a non-projected leaf."""
    params = {"b": jnp.asarray([1.0, -2.0, 3.0])}
    grads = {"b": jnp.asarray([0.5, 0.5, -1.0])}
    lr, wd = 0.1, 0.5
    opt = fo.fira(lr, rank=2, weight_decay=wd)
    updates, _ = opt.update(grads, opt.init(params), params)
    # First AdamW step with bias correction: direction = g/(|g| + eps) · √(1−b2)/(1−b1)·...
    # = sign(g) up to eps; then decay of the updated weight.
    step = -lr * grads["b"] / (jnp.abs(grads["b"]) + 1e-6 / np.sqrt(1 - 0.999))
    expected = step - lr * wd * (params["b"] + step)
    np.testing.assert_allclose(updates["b"], expected, rtol=1e-5)


def test_block_chain_equals_scale_by_fira():
    params, loss_fn = matrix_problem(seed=2)
    chain = block_chain(4, 3, 0.25)
    alias = fo.scale_by_fira(4, update_proj_gap=3, scale=0.25)
    s1, s2 = chain.init(params), alias.init(params)
    for _ in range(7):
        grads = jax.grad(loss_fn)(params)
        u1, s1 = jax.jit(chain.update)(grads, s1, params)
        u2, s2 = jax.jit(alias.update)(grads, s2, params)
        # The same blocks, built twice (by hand and by the alias) and jitted separately: equal
        # to float32 round-off (bitwise only for the same compiled program).
        assert_round_off(u1, u2, ROUND_OFF, "chain vs alias")
        params = optax.apply_updates(params, jax.tree.map(lambda u: -1e-2 * u, u1))


@pytest.mark.slow
def test_ablations_differ_as_expected():
    """No residual == GaLore; no limiter differs from Fira only once the limiter engages."""
    params, loss_fn = matrix_problem(seed=3)
    galore = fo.scale_by_galore(4, update_proj_gap=3, scale=0.25)
    no_residual = block_chain(4, 3, 0.25, residual=False)
    no_limiter = block_chain(4, 3, 0.25, limiter=False)
    fira = block_chain(4, 3, 0.25)
    states = [t.init(params) for t in (galore, no_residual, no_limiter, fira)]
    diffs = []
    for i in range(6):
        grads = jax.grad(loss_fn)(params)
        if i == 4:
            grads = jax.tree.map(lambda g: 50.0 * g, grads)  # a spike
        outs = [
            t.update(grads, s, params)
            for t, s in zip((galore, no_residual, no_limiter, fira), states, strict=True)
        ]
        states = [o[1] for o in outs]
        u_galore, u_no_res, u_no_lim, u_fira = (o[0] for o in outs)
        # The alias vs the blocks built by hand: float32 round-off (see _roundoff.py).
        assert_round_off(u_galore, u_no_res, ROUND_OFF, "galore vs chain without residual")
        diffs.append(float(jnp.abs(u_no_lim["w1"] - u_fira["w1"]).max()))
        params = optax.apply_updates(params, jax.tree.map(lambda u: -1e-2 * u, u_fira))
    # The first step only remembers the norm: the limiter divides φ by exactly 1, and op by
    # op (no jit) the rest are the same ops on equal inputs, so exactly equal.
    assert diffs[0] == 0.0
    assert diffs[4] > 1e-2  # the spike is limited


def test_fused_residual_matches_explicit_formula():
    """project_back's fused form equals α·back(N) + φ⊙(G − α·back(R)) built explicitly."""
    rng = np.random.default_rng(0)
    for shape, proj_type in [((20, 12), "std"), ((12, 20), "std"), ((16, 16), "left")]:
        grad = jnp.asarray(rng.normal(size=shape), jnp.float32)
        chain = block_chain(5, 10, 0.3, proj_type=proj_type, limiter=False)
        out, _ = chain.update({"w": grad}, chain.init({"w": grad}), None)
        project = fo.project(fo.ProjectionSpec(5, proj_type), update_proj_gap=10, scale=0.3)
        nodes, _ = project.update({"w": grad}, project.init({"w": grad}))
        u = nodes["w"]
        r = np.asarray(u.low_rank, np.float64)
        p = np.asarray(u.basis, np.float64)
        m = 0.1 * r
        v = 0.001 * r**2
        n = m / (np.sqrt(v) + 1e-6)
        left = u.side == "left"
        back = (lambda x, p=p: p @ x) if left else (lambda x, p=p: x @ p)
        axis = 0 if left else 1
        phi = np.linalg.norm(n, axis=axis, keepdims=True) / (
            np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8
        )
        g = np.asarray(grad, np.float64)
        expected = (0.3 * back(n) + phi * (g - 0.3 * back(r))) * np.sqrt(0.001) / 0.1
        np.testing.assert_allclose(out["w"], expected, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
class VariantsTest(chex.TestCase):
    """Every optimizer and the block chain give the same steps with and without jit.

    chex's ``with_device`` / ``without_device`` variants are left out: like ``without_jit``
    they run the update op by op (only the inputs' placement differs), at ~45 s each here.
    """

    @chex.variants(with_jit=True, without_jit=True)
    def test_same_updates_with_and_without_jit(self):
        for name in sorted(OPTIMIZERS):
            opt = OPTIMIZERS[name]()
            params, loss_fn = matrix_problem(seed=4)
            grads = [
                jax.grad(loss_fn)(jax.tree.map(lambda p, t=t: p * (1 + 0.1 * t), params))
                for t in range(7)
            ]  # refreshes at steps 1 and 6
            ref_state, var_state = opt.init(params), opt.init(params)
            ref_update, var_update = jax.jit(opt.update), self.variant(opt.update)
            for g in grads:
                want, ref_state = ref_update(g, ref_state, params)
                got, var_state = var_update(g, var_state, params)
                # Op by op vs one compiled program: float32 round-off over 7 steps (measured
                # ≤ 3.3e-7 of the largest update entry, ≤ 1/16 of these bounds, under SSE4.2,
                # AVX2 and AVX-512 code).
                chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
                chex.assert_trees_all_equal_structs(got, params)
            chex.assert_trees_all_close(var_state, ref_state, rtol=1e-5, atol=1e-6)
