"""Sharded Fira/GaLore on 8 CPU devices (2×4 mesh) matches the single-device step.

The body runs in a subprocess (`python -m tests._sharded_check`): the 8 host devices must be
requested before jax's backend starts. Layouts of a small LLaMA tree with stacked `(L, m, n)`
leaves: FSDP, tensor parallel, 2-D FSDP+TP and the L axis sharded.
7 steps, refreshes at steps 1, 4, 7.

The refresh runs one matrix at a time (`fira_optax._refresh.refresh_basis`): XLA:CPU's
batched LAPACK kernels split a batch over the intra-op pool and block on it, which deadlocked
8 host devices on 2 cores before. The randomized refresh is not compared here: on these
rank-8-plus-noise gradients with rank 16 the trailing basis vectors span pure noise, and the
float32 differences of a sharded matmul (~1e-6) rotate them freely inside that flat spectrum
(the refresh itself is shard-invariant: `test_randomized_refresh_is_shard_invariant`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from optax.tree_utils import tree_get

import fira_optax as fo
from fira_optax import _testing

_ROOT = Path(__file__).resolve().parents[1]


def _run(*jobs: str, timeout: float = 600) -> list[dict]:
    return _testing.run_device_jobs("tests._sharded_check", *jobs, cwd=_ROOT, timeout=timeout)


def _check(result: dict) -> None:
    name = f"{result['optimizer']}/{result['layout']}"
    assert result["sharding_ok"], f"{name}: state shardings changed: {result['bad']}"
    # The sharded step splits the projection's sums (R = PᵀG over up to 160 terms) and the
    # norms across devices: float32 round-off in another order. Adam divides each entry of R by
    # its own √ν, so an entry's relative error is that of R's entry, u·Σ|P||G| / |R| (u = 6e-8):
    # large where the projection cancels (the trailing basis vectors here span noise). Measured
    # under SSE4.2, AVX2 and AVX-512 code: state ≤ 6.3e-7, updates from step 2 on ≤ 9e-7
    # (Frobenius, GaLore), step 1 ≤ 7e-6; the bounds leave ≥ 7× and stay far below what a
    # wrong shard or gather gives (O(1)).
    # Every state leaf (bases, moments, limiter memory): max-relative to the leaf's largest entry.
    assert result["state_max_rel"] <= 1e-5, (name, result["where"])
    # Updates from step 2 on (Frobenius); step 1 is Adam's ill-conditioned first step
    # (N ≈ R / |R|, see tests/_sharded_check.py), bounded more loosely.
    assert result["updates_frob_rel_after_step1"] <= 1e-5, (name, result["where"])
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


@pytest.mark.slow
def test_sharded_fira_and_galore_match_single_device():
    results = _run("fira:fsdp_tp", "galore:tp")
    assert len(results) == 2
    for r in results:
        _check(r)


@pytest.mark.slow
def test_sharded_family_matches_single_device():
    """APOLLO (random projection), GoLore (SVD, then random orthonormal) and FRUGAL keep
    their state's shardings and match one device as Fira does."""
    results = _run("apollo:fsdp_tp", "golore:tp", "frugal:fsdp")
    assert len(results) == 3
    for r in results:
        _check(r)


_REFRESH_SCRIPT = """
from fira_optax import _testing
_testing.request_host_devices(8)  # after the parent's flags (e.g. --xla_cpu_max_isa)
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


def test_randomized_refresh_is_shard_invariant():
    """Same basis sharded as on one device, to float32 round-off times the conditioning.

    The sharded matmuls round in another order; the basis moves by ~u·σ₁/gap (u = 6e-8), and
    for these Gaussian 64×160 matrices the smallest gap among the top 9 singular values is down
    to 0.066 (σ₁/gap ≤ 310): ~2e-5 per ulp (measured ≤ 2.4e-5 under SSE4.2, AVX2 and AVX-512
    code). The bound, 2e-4 (~10 u·σ₁/gap), is far below what a per-shard key or a wrong gather
    gives (O(1) on entries of size ~0.1).
    """
    diffs = [float(x) for x in _testing.run_device_snippet(_REFRESH_SCRIPT, timeout=300).split()]
    assert len(diffs) == 3 and max(diffs) < 2e-4, diffs


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
            fo.project(fo.ProjectionSpec(4)),
            fo.scale_by_low_rank_adam(fo.ProjectionSpec(4)),
            fo.project_back(),
            optax.sgd(1.0),
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
    bases, mu, nu, norms = (tree_get(sh, name) for name in ("bases", "mu", "nu", "norms"))
    # up (16 < 40): left side; basis (2,16,4) keeps m (unsharded), moments (2,4,40) keep n.
    assert bases["up"].spec == P("data", None, None)
    assert mu["up"].spec == P("data", None, "model")
    # down (40 ≥ 16): right side; basis (2,4,16) keeps n, moments (2,40,4) keep m.
    assert bases["down"].spec == P("data", None, None)
    assert nu["down"].spec == P("data", "model", None)
    assert norms["up"].spec == P("data")
    counts = optax.tree_utils.tree_get_all_with_path(sh, "count")
    assert counts and all(count.spec == P() for _, count in counts)


def test_partition_specs_without_mesh_raise():
    with pytest.raises(ValueError, match="mesh"):
        fo.optimizer_state_shardings(fo.fira(1e-3, 4), {"w": jnp.zeros((8, 8))}, {"w": P()})


_WRAPPERS_SCRIPT = """
import json
from fira_optax import _testing
_testing.request_host_devices(8)  # after the parent's flags (e.g. --xla_cpu_max_isa)
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
views = {"embed": (64, 32), "attn": {"query": {"kernel": (32, 32)}}, "mlp": {"up": (32, 64)},
         "layers": {"w": (32, 64)}, "b": (64, 1)}  # each leaf's matrix (b: a vector)
frames = np.random.default_rng(1)

def frame(m, d):
    # d orthonormal columns; in the first 4 every |entry| >= 0.004 and the largest is ahead
    # of the next by >= 1e-3 (so round-off cannot flip a basis vector's canonical sign)
    while True:
        q = np.linalg.qr(frames.standard_normal((m, d)))[0]
        top = np.sort(np.abs(q[:, :4]), axis=0)
        if top[0].min() >= 0.004 and (top[-1] - top[-2]).min() >= 1e-3:
            return q

def leaf_grads(shape, view):
    # per matrix U diag(s_t) V^T: top 4 singular values (6, 5, 4, 3)(1 + t/10) over a tail
    # 1 .. 0.1 (gaps >= 1); a vector: entries in [0.5, 1.5]
    m, n = view
    if n == 1:
        return [1.0 + 0.5 * np.sin(np.arange(m) + t) for t in range(4)]
    d, out = min(m, n), []
    for _ in range(int(np.prod(shape)) // (m * n)):
        u, v = frame(m, d), frame(n, d)
        tail = np.linspace(1.0, 0.1, d - 4)
        out.append([(u * np.r_[(6.0 - np.arange(4)) * (1 + t / 10), tail]) @ v.T
                    for t in range(4)])
    return [np.stack([x[t] for x in out]).reshape(shape) for t in range(4)]

per_leaf = jax.tree.map(leaf_grads, shapes, views, is_leaf=is_shape)
grads = [jax.tree.map(lambda g, t=t: jnp.asarray(g[t], jnp.float32), per_leaf,
                      is_leaf=lambda x: isinstance(x, list)) for t in range(4)]
param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
mask = fo.projected_mask(params, fo.ProjectionSpec(rank=4))
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


@pytest.mark.slow
def test_state_shardings_through_optax_wrappers_on_8_devices():
    """MultiSteps, inject_hyperparams, apply_if_finite, chain, multi_transform, masked.

    Values: every update and state leaf of the 4 steps (refreshes at steps 1 and 3) on the
    2×4 mesh within 1e-5 of the single-device run, relative to the leaf's largest entry. The
    sharded step sums in another order (and `chain`'s clip factor is a sharded global norm, so
    its clipped G differs by ulps), which the computation amplifies by its conditioning, fixed
    by the gradients: the SVD moves a basis by ~‖δG‖/gap, with ‖G‖_F / gap ≤ 10 here (top
    singular values (6, 5, 4, 3)·(1 + t/10) over a tail ≤ 1), i.e. ~6e-7 per ulp (u = 6e-8)
    of G, twice that in Adam's ν (R²); every entry of R = PᵀG is ≥ 0.013 (5e-4 after `chain`'s
    clip to norm 1) ≫ eps = 1e-6, so Adam's first step (≈ sign R) does not amplify δR.
    Measured ≤ 1.1e-6 under SSE4.2, AVX2 and AVX-512 code; 1e-5 leaves ~10× and is far below
    what a real error gives (a lost hyper-parameter or mask: O(1)).
    """
    stdout = _testing.run_device_snippet(_WRAPPERS_SCRIPT, timeout=600)
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
        assert r["max_rel_diff"] < 1e-5, r  # float32 round-off × conditioning ≤ 10 (docstring)


def test_state_shardings_of_an_opaque_state_fail_naming_the_holder():
    class Opaque(NamedTuple):
        thing: object

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params = {"w": jnp.zeros((8, 8))}
    bad = (fo.fira(1e-3, 4).init(params), Opaque(object()))
    with pytest.raises(TypeError, match="the state of Opaque holds a object"):
        fo.optimizer_state_shardings(bad, params, {"w": P()}, mesh=mesh)
