"""The divided refresh on a mesh (8 CPU devices) and the staggered refresh schedule.

The 8-device cases run in a subprocess (`python -m tests._distributed_check`): the host devices
must be requested before jax's backend starts. For each case the bases of the divided refresh
(`refresh_shardings=`) must equal the single-device ones after every step (refreshes at
steps 1, 4, 7; staggered: every step), the compiled refresh branch must all-gather nothing
wider than a basis (the replicated refresh all-gathers whole gradients), each device must
receive less than an all-gather of the gradients would bring it, the non-refresh branch must
keep exactly the collectives it has without the division, and every state leaf its requested
sharding.
"""

from __future__ import annotations

import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _roundoff import ROUND_OFF, assert_round_off
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fira_optax as fo
from fira_optax import _schedule, _testing
from fira_optax._testing import random_gradients

_ROOT = Path(__file__).resolve().parents[1]


def _run(*jobs: str, timeout: float = 900) -> list[dict]:
    results = _testing.run_device_jobs(
        "tests._distributed_check", *jobs, cwd=_ROOT, timeout=timeout
    )
    assert len(results) == len(jobs), results
    return results


def _check(r: dict) -> None:
    case = r["case"]
    assert r["refreshes"] >= 30, r  # every matrix refreshed at least once
    # Same bases: the exact SVD to the bit here; the randomized refresh to float32 round-off
    # (a right basis is computed on the transposed gradient's copy: other matmul rounding).
    tol = 1e-6 if case.startswith("svd") else 1e-4
    assert r["basis_max_abs"] <= tol, r
    # Nothing wider than a basis is all-gathered (bases' rows, one flag per matrix)...
    assert r["refresh_all_gather_width"] <= r["rank"], r
    if case.startswith("svd"):  # ... while the replicated refresh gathers whole gradients.
        assert r["old_refresh_all_gather_width"] > r["rank"], r
    # Each device receives less than an all-gather of the gradients would bring it.
    assert 0 < r["moved_bytes"] < 7 * r["grad_bytes_per_device"], r
    assert r["normal_step_same"], r
    assert r["shardings_kept"], r


@pytest.mark.slow
def test_divided_refresh_equals_single_device_fsdp_and_fsdp_tp():
    # fsdp_tp+unit: a mesh axis of size 1 that no param names (the example's data=1 axis).
    for result in _run(
        "svd:official:fsdp", "randomized:official:fsdp_tp", "svd:official:fsdp_tp+unit"
    ):
        _check(result)


@pytest.mark.slow
def test_divided_refresh_staggered_tp_and_layer_sharded():
    for result in _run(
        "svd:staggered:fsdp_tp",
        "randomized:staggered:fsdp",
        "svd:official:tp",
        "svd:official:layer_sharded",
    ):
        _check(result)


# ----------------------------------------------------------------------------------------------
# On one device: the divided path is off, the API checks, the staggered schedule.


def _llama(layers: int = 2, d: int = 32, f: int = 64) -> dict:
    rng = np.random.default_rng(0)

    def w(*shape):
        return jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)

    return {
        "embed": w(50, d),
        "layers": {
            "attn": {name: w(layers, d, d) for name in ("q", "k", "v", "o")},
            "mlp": {"gate": w(layers, d, f), "up": w(layers, d, f), "down": w(layers, f, d)},
        },
        "head": w(d, 50),
    }


def _refreshed(before, after) -> list[np.ndarray]:
    """Per projected leaf, which matrices got a new basis (bool per stack index)."""
    out = []
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        out.append(np.asarray(jnp.any(a != b, axis=(-2, -1))))
    return out


def test_refresh_shardings_on_one_device_is_the_plain_refresh():
    params = _llama()
    mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    tx_plain = fo.fira(1e-2, 8, update_proj_gap=2, refresh_schedule="staggered")
    tx_mesh = fo.fira(
        1e-2, 8, update_proj_gap=2, refresh_schedule="staggered", refresh_shardings=shardings
    )
    s1, s2 = tx_plain.init(params), tx_mesh.init(params)
    for t in range(3):
        g = random_gradients(params, 1, seed=t)[0]
        u1, s1 = jax.jit(tx_plain.update)(g, s1, params)
        u2, s2 = jax.jit(tx_mesh.update)(g, s2, params)
        # Another program (the refresh under the mesh's sharding constraints) on the same
        # gradients: float32 round-off; counts and flags equal.
        assert_round_off((u1, s1), (u2, s2), ROUND_OFF, f"step {t + 1}")


def test_bad_schedule_and_shardings_raise():
    with pytest.raises(ValueError, match="refresh_schedule"):
        fo.fira(1e-2, 8, refresh_schedule="round_robin")
    with pytest.raises(TypeError, match="NamedSharding"):
        fo.galore(1e-2, 8, refresh_shardings={"w": P("fsdp")})
    with pytest.raises(ValueError, match="no NamedSharding"):
        fo.project(fo.ProjectionSpec(8), refresh_shardings={"w": None})


def test_state_layout_is_the_same_for_every_schedule():
    params = _llama()
    official = fo.fira(1e-2, 8).init(params)
    staggered = fo.fira(1e-2, 8, refresh_schedule="staggered").init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(official, staggered)
    assert jax.tree.structure(official) == jax.tree.structure(staggered)


def test_staggered_offsets_spread_and_balance():
    plans = fo.ProjectionSpec(8).flat_plans(_llama(layers=4))
    matrices = sum(math.prod(p.batch_shape) for p in plans if p is not None)  # 28
    # At most T matrices: all phases distinct, evenly spread, the costliest first.
    offsets = _schedule.offsets(plans, 200, "svd")
    flat = np.concatenate([o.ravel() for o in offsets if o is not None])
    assert len(set(flat.tolist())) == matrices == 28
    assert flat.min() == 0 and flat.max() == (27 * 200) // 28
    assert np.all(np.diff(np.sort(flat)) >= 200 // 28)
    # More matrices than phases: the summed cost per phase is balanced (LPT).
    offsets = _schedule.offsets(plans, 5, "svd")
    load = np.zeros(5)
    for plan, o in zip(plans, offsets, strict=True):
        if plan is not None:
            m, n = plan.view.m, plan.view.n
            np.add.at(load, o.ravel(), m * n * min(m, n))
    biggest = max(p.view.m * p.view.n * min(p.view.m, p.view.n) for p in plans if p)
    assert load.max() - load.min() <= biggest
    # Deterministic.
    again = _schedule.offsets(plans, 5, "svd")
    for a, b in zip(offsets, again, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("gap", [3, pytest.param(40, marks=pytest.mark.slow)])
def test_staggered_schedule_refreshes_each_matrix_once_per_window(gap):
    """Step 1: every matrix; then matrix j exactly when its count s ≡ o_j (mod T)."""
    params = _llama()
    plans = fo.ProjectionSpec(8).flat_plans(params)
    offsets = [o for o in _schedule.offsets(plans, gap, "svd") if o is not None]
    tx = fo.fira(1e-2, 8, update_proj_gap=gap, refresh_schedule="staggered")
    state = tx.init(params)
    update = jax.jit(tx.update)
    steps = min(2 * gap + 1, 13)
    for t in range(steps):  # t = the count of every matrix before this step
        before = optax.tree_utils.tree_get(state, "bases")
        _, state = update(random_gradients(params, 1, seed=t)[0], state, params)
        refreshed = _refreshed(before, optax.tree_utils.tree_get(state, "bases"))
        for got, offset in zip(refreshed, offsets, strict=True):
            want = np.full(offset.shape, True) if t == 0 else (t % gap == offset)
            np.testing.assert_array_equal(got, want, err_msg=f"step {t + 1}")
        if t > 0:  # about 1/T of the matrices on each step
            count = sum(int(r.sum()) for r in refreshed)
            assert count <= -(-14 // gap), (t, count)


def test_staggered_idle_expert_gets_its_first_basis_when_it_first_trains():
    params = {"experts": {"w": jnp.ones((3, 16, 24))}}
    tx = fo.galore(1e-2, 4, update_proj_gap=4, refresh_schedule="staggered")
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for t in range(6):
        g = rng.standard_normal((3, 16, 24)).astype(np.float32)
        if t < 3:
            g[1] = 0.0  # expert 1 idle for three steps
        before = optax.tree_utils.tree_get(state, "bases")["experts"]["w"]
        _, state = update({"experts": {"w": jnp.asarray(g)}}, state, params)
        after = optax.tree_utils.tree_get(state, "bases")["experts"]["w"]
        if t < 3:
            assert not np.any(np.asarray(after[1])), "an idle expert has no basis yet"
        if t == 3:  # its first non-idle step: its first basis
            assert np.any(np.asarray(after[1] != before[1]))
    np.testing.assert_array_equal(
        np.asarray(optax.tree_utils.tree_get(state, "steps")["experts"]["w"]), [6, 3, 6]
    )


def test_staggered_fira_in_multi_transform_follows_the_masked_whole_tree_run():
    params = _llama()
    mask = fo.projected_mask(params, fo.ProjectionSpec(rank=8))
    labels = jax.tree.map(lambda p: "fira" if p else "adam", mask)

    def fira():
        return fo.fira(1e-2, 8, update_proj_gap=3, refresh_schedule="staggered")

    tx_multi = optax.multi_transform({"fira": fira(), "adam": optax.adam(1e-3)}, labels)
    tx_whole = fo.fira(1e-2, 8, update_proj_gap=3, refresh_schedule="staggered", projected=mask)
    s_multi, s_whole = tx_multi.init(params), tx_whole.init(params)
    for t in range(5):
        g = random_gradients(params, 1, seed=t)[0]
        u_multi, s_multi = jax.jit(tx_multi.update)(g, s_multi, params)
        u_whole, s_whole = jax.jit(tx_whole.update)(g, s_whole, params)
        # A sub-tree vs the whole tree: two programs, float32 round-off.
        assert_round_off(u_multi["layers"], u_whole["layers"], ROUND_OFF, f"step {t + 1}")
