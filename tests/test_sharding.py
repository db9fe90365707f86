"""Sharded Fira/GaLore on 8 CPU devices (2×4 mesh) equals the single-device step.

The body runs in a subprocess (`tests/_sharded_check.py`): the 8 host devices must be requested
before jax is imported. Layouts of a small LLaMA tree with stacked `(L, m, n)` leaves: FSDP,
tensor parallel, 2-D FSDP+TP and the L axis sharded. 7 steps, refreshes at steps 1, 4, 7.

The refresh runs one matrix at a time (`fira_optax._refresh.refresh_basis`): XLA:CPU's
batched LAPACK kernels split a batch over the intra-op pool and block on it, which deadlocked
8 host devices on 2 cores before. The randomized refresh is not compared here: on these
rank-8-plus-noise gradients with rank 16 the trailing basis vectors span pure noise, and the
float32 differences of a sharded matmul (~1e-6) rotate them freely inside that flat spectrum
(the refresh itself is shard-invariant: `test_randomized_refresh_is_shard_invariant`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _harness import run_device_jobs
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fira_optax as fo

_SCRIPT = Path(__file__).with_name("_sharded_check.py")


def _run(*jobs: str, timeout: float = 600) -> list[dict]:
    return run_device_jobs(_SCRIPT, *jobs, timeout=timeout)


def _check(result: dict) -> None:
    name = f"{result['optimizer']}/{result['layout']}"
    assert result["sharding_ok"], f"{name}: state shardings changed: {result['bad']}"
    # Every state leaf (bases, moments, limiter memory) within 1e-6 of the single-device run.
    assert result["state_max_rel"] <= 1e-6, (name, result["where"])
    # Updates: from step 2 on ≤ 1e-6 (Frobenius); step 1 is Adam's ill-conditioned first step
    # (see _sharded_check.py), bounded more loosely.
    assert result["updates_frob_rel_after_step1"] <= 1e-6, (name, result["where"])
    assert result["updates_frob_rel"] <= 5e-5, (name, result["where"])
    mem = result["bytes_per_device"]
    assert mem["sharded"]["argument"] < 0.35 * mem["single"]["argument"], (name, mem)
    sharded_total = sum(mem["sharded"].values())
    single_total = sum(mem["single"].values())
    assert sharded_total < 0.6 * single_total, (name, mem)


@pytest.mark.slow
def test_sharded_fira_matches_single_device_all_layouts():
    results = _run("fira")
    assert {r["layout"] for r in results} == {"fsdp", "tp", "fsdp_tp", "layer_sharded"}
    for r in results:
        _check(r)


def test_sharded_fira_and_galore_match_single_device():
    results = _run("fira:fsdp_tp", "galore:tp")
    assert len(results) == 2
    for r in results:
        _check(r)


_REFRESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fira_optax._refresh import refresh_basis
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
g = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64, 160)), jnp.float32)
b = jnp.zeros((4, 64, 8), jnp.float32)
f = jax.jit(lambda g, b: refresh_basis(g, b, 8, "left", jax.random.key(3), "randomized"))
ref = f(g, b)
for spec in [P("data", None, None), P("data", "model", None), P(None, "model", None)]:
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(spec[0], spec[1], None)))
    print(float(jnp.abs(f(put(g), put(b)) - ref).max()))
"""


def _run_snippet(script: str, timeout: float) -> str:
    """Runs `python -c script` on 8 host devices (the script sets XLA_FLAGS); its stdout."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_randomized_refresh_is_shard_invariant():
    diffs = [float(x) for x in _run_snippet(_REFRESH_SCRIPT, timeout=300).split()]
    assert len(diffs) == 3 and max(diffs) < 1e-4, diffs


# ----------------------------------------------------------------------------------------------
# The sharding rule itself, on one device (a 1×1 mesh): shapes → PartitionSpecs.


def test_state_partition_spec_rule():
    rule = fo._sharding.state_partition_spec
    spec = P("l", "m", "n")
    shape = (4, 32, 64)
    assert rule((4, 32, 64), shape, spec) == P("l", "m", "n")  # full moments
    assert rule((4, 32, 8), shape, spec) == P("l", "m", None)  # left basis / right moments
    assert rule((4, 8, 64), shape, spec) == P("l", None, "n")  # right basis / left moments
    assert rule((4,), shape, spec) == P("l")  # limiter memory
    assert rule((), shape, spec) == P()  # counts
    assert rule((4, 32), (4, 32), P(None, "m")) == P(None, "m")  # a non-matrix param


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: fo.fira(1e-3, 4),
        lambda: fo.galore(1e-3, 4),
        lambda: optax.chain(
            fo.project(4), fo.scale_by_low_rank_adam(rank=4), fo.project_back(), optax.sgd(1.0)
        ),
        lambda: optax.adamw(1e-3),
    ],
    ids=["fira", "galore", "chain", "adamw"],
)
def test_state_shardings_match_state_structure(make_tx):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params = {"w": jnp.zeros((8, 16)), "stack": jnp.zeros((3, 16, 8)), "b": jnp.zeros(16)}
    specs = {"w": P(None, "model"), "stack": P("data", "model", None), "b": P()}
    tx = make_tx()
    shardings = fo.optimizer_state_shardings(tx, params, specs, mesh=mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert isinstance(s, NamedSharding)
        assert len(s.spec) <= x.ndim
        if x.ndim == 0:
            assert s.spec == P()
    # Default: the params' own shardings.
    placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    again = fo.optimizer_state_shardings(tx, placed)
    assert jax.tree.map(lambda s: s.spec, again) == jax.tree.map(lambda s: s.spec, shardings)


def test_fira_state_specs_follow_the_kept_axis():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params = {"up": jnp.zeros((2, 16, 40)), "down": jnp.zeros((2, 40, 16))}
    specs = {"up": P("data", None, "model"), "down": P("data", "model", None)}
    tx = fo.fira(1e-3, 4)
    sh = fo.optimizer_state_shardings(tx, params, specs, mesh=mesh)
    project_state, adam_state, _, limiter_state, _ = sh[0]
    # up (16 < 40): left side; basis (2,16,4) keeps m (unsharded), moments (2,4,40) keep n.
    assert project_state.bases["up"].spec == P("data", None, None)
    assert adam_state.mu["up"].spec == P("data", None, "model")
    # down (40 ≥ 16): right side; basis (2,4,16) keeps n, moments (2,40,4) keep m.
    assert project_state.bases["down"].spec == P("data", None, None)
    assert adam_state.nu["down"].spec == P("data", "model", None)
    assert limiter_state.norms["up"].spec == P("data")
    assert project_state.count.spec == P()


def test_partition_specs_without_mesh_raise():
    with pytest.raises(ValueError, match="mesh"):
        fo.optimizer_state_shardings(fo.fira(1e-3, 4), {"w": jnp.zeros((8, 8))}, {"w": P()})


_WRAPPERS_SCRIPT = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import fira_optax as fo

mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
rng = np.random.default_rng(0)
shapes = {"embed": (64, 32), "attn": {"query": {"kernel": (32, 4, 8)}}, "mlp": {"up": (32, 64)},
          "layers": {"w": (4, 32, 64)}, "b": (64,)}
specs = {"embed": P("model", None), "attn": {"query": {"kernel": P("data", "model", None)}},
         "mlp": {"up": P("data", "model")}, "layers": {"w": P("model", None, "data")}, "b": P()}
is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=is_shape)
grads = [jax.tree.map(lambda p, t=t: jnp.cos(p * (t + 1.0)), params) for t in range(4)]
param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
mask = fo.projected_mask(params, rank=4)
labels = jax.tree.map(lambda m: "fira" if m else "adam", mask)
fira = lambda: fo.fira(1e-2, 4, update_proj_gap=2, scale=0.25)
wrappers = {
    "MultiSteps": optax.MultiSteps(fira(), every_k_schedule=2),
    "inject_hyperparams": optax.inject_hyperparams(
        fo.fira, static_args=("rank", "update_proj_gap"))(learning_rate=1e-2, rank=4,
                                                          update_proj_gap=2),
    "apply_if_finite": optax.apply_if_finite(fira(), max_consecutive_errors=3),
    "chain": optax.chain(optax.clip_by_global_norm(1.0), fira()),
    "multi_transform": optax.multi_transform({"fira": fira(), "adam": optax.adamw(1e-3)}, labels),
    "masked": optax.masked(fira(), mask),
}
for name, tx in wrappers.items():
    sh = fo.optimizer_state_shardings(tx, params, param_sh)
    def run(state, p_sh, s_sh):
        step = jax.jit(lambda g, s, p: tx.update(g, s, p),
                       in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
        out = []
        for g in grads:
            u, state = step(jax.device_put(g, p_sh), state, jax.device_put(params, p_sh))
            out.append((u, state))
        return out
    sharded = run(jax.jit(tx.init, out_shardings=sh)(jax.device_put(params, param_sh)),
                  param_sh, sh)
    single = run(tx.init(params), None, None)
    f64 = lambda x: np.asarray(x, np.float64)
    diff = max(float(np.max(np.abs(f64(a) - f64(b)))) / (float(np.max(np.abs(f64(b)))) + 1e-12)
               for (ua, sa), (ub, sb) in zip(sharded, single)
               for a, b in zip(jax.tree.leaves((ua, sa)), jax.tree.leaves((ub, sb))) if a.size)
    leaves, want = jax.tree.leaves(sharded[-1][1]), jax.tree.leaves(sh)
    kept = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, want))
    n_sharded = sum(1 for s in want if any(e is not None for e in s.spec))
    print(json.dumps({"wrapper": name, "max_rel_diff": diff, "shardings_kept": kept,
                      "same_structure": len(leaves) == len(want), "n_sharded": n_sharded}))
"""


def test_state_shardings_through_optax_wrappers_on_8_devices():
    """MultiSteps, inject_hyperparams, apply_if_finite, chain, multi_transform, masked."""
    stdout = _run_snippet(_WRAPPERS_SCRIPT, timeout=600)
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert {r["wrapper"] for r in results} == {
        "MultiSteps",
        "inject_hyperparams",
        "apply_if_finite",
        "chain",
        "multi_transform",
        "masked",
    }
    for r in results:
        assert r["same_structure"] and r["shardings_kept"], r
        assert r["n_sharded"] >= 4, r  # bases / moments follow the params' shardings
        assert r["max_rel_diff"] < 1e-4, r


def test_state_shardings_of_an_opaque_state_fail_naming_the_holder():
    class Opaque(NamedTuple):
        thing: object

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params = {"w": jnp.zeros((8, 8))}
    bad = (fo.fira(1e-3, 4).init(params), Opaque(object()))
    with pytest.raises(TypeError, match="the state of Opaque holds a object"):
        fo.optimizer_state_shardings(bad, params, {"w": P()}, mesh=mesh)
