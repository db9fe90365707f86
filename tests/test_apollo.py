"""APOLLO and APOLLO-Mini (`fo.apollo`, `fo.apollo_mini`, `fo.scale_by_apollo`, the block
`fo.norm_scale_gradient`) against the official `apollo-torch==1.0.3` `APOLLOAdamW` on identical
gradient sequences, our random projection's statistics, and the optax contract.

Parity metric (per leaf, `_harness.relative_errors`): max over steps and entries of
|W_ours − W_official| / max |W_official_final − W0| ≤ 1e-4, both sides in float32. With
`proj="svd"` both sides use the sign-canonical SVD basis (the moments are carried across a
refresh, so the sign matters); with `proj="random"` the official projection matrices are
recorded at every refresh and replayed into ours through `refresh=callable`.

Run ``python tests/test_apollo.py`` for a table of the parity errors per case and leaf.
"""

from __future__ import annotations

import dataclasses
import doctest

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _harness import learning_rates, relative_errors, run_ours
from _official import projection_recorder, replay_refresh, run_official

import fira_optax as fo
from fira_optax import _apollo
from fira_optax._limiter import residual_norm
from fira_optax._node import is_low_rank
from fira_optax._shapes import side_for
from fira_optax._testing import make_problem, state_bytes

TOL = 1e-4
STEPS = 24
GAP = 6  # refreshes at steps 1, 7, 13, 19
SEED = 0
SPIKE = 50.0  # a burst of 50× the gradient's RMS entry (outside any low-rank subspace)

MATRICES = {"tall": (48, 24), "wide": (24, 48), "square": (32, 32)}
PLAIN = {"bias": (32,), "dense": (16, 24)}  # never projected: plain AdamW on both sides


@dataclasses.dataclass(frozen=True)
class Case:
    proj: str = "svd"  # the official `proj`: "svd", or "random" (recorded and replayed)
    proj_type: str = "std"
    rank: int = 8
    scale_type: str = "channel"
    scale: float = 1.0
    scale_front: bool = False
    limiter: bool = True  # False: the official disable_nl=True, ours gamma=None
    weight_decay: float = 0.0
    schedule: bool = False
    spike: int | None = None  # 0-based step of a burst (the limiter engages)
    tiny: bool = False  # gradients × 1e-12 from zero weights: ‖S‖ ~ the limiter's 1e-8
    mini: bool = False  # ours through fo.apollo_mini (rank 1, tensor)

    @property
    def id(self) -> str:
        parts = ["mini" if self.mini else "apollo", self.proj, self.proj_type, f"r{self.rank}"]
        parts.append(self.scale_type)
        for flag, name in [
            (self.scale != 1.0, f"s{self.scale:g}"),
            (self.scale_front, "front"),
            (not self.limiter, "nolimiter"),
            (self.weight_decay, f"wd{self.weight_decay:g}"),
            (self.schedule, "sched"),
            (self.spike is not None, f"spike{(self.spike or 0) + 1}"),
            (self.tiny, "tiny"),
        ]:
            if flag:
                parts.append(name)
        return "-".join(parts)

    def learning_rate(self):
        if self.schedule:
            return optax.warmup_cosine_decay_schedule(0.0, 2e-2, 5, STEPS, end_value=1e-3)
        return 1e-2


def official_supported(shape: tuple[int, int], proj_type: str, scale_type: str) -> bool:
    """Where the official code computes APOLLO's channel scale.

    It reduces over `norm_dim = 0 if m < n else 1` of the full gradient's shape: R's rank
    axis exactly when the projection side is the "std" one. On the other side it crashes
    (k > 1) or, at k = 1, broadcasts to the tensor-wise scale
    (`test_official_channel_rule_off_the_std_side`); ours always reduces the rank axis.
    """
    if scale_type == "tensor":
        return True
    m, n = shape
    return side_for(m, n, proj_type) == side_for(m, n, "std")


def _cases() -> list[Case]:
    cases = []
    for proj in ("svd", "random"):
        for pt in ("std", "reverse_std", "left", "right"):
            cases.append(Case(proj, pt, scale_type="channel"))
            cases.append(Case(proj, pt, scale_type="tensor"))
        cases.append(Case(proj, "std", rank=1))  # k = 1, channel
        cases.append(Case(proj, "std", scale=2.0, weight_decay=0.1, schedule=True))
        cases.append(Case(proj, "std", spike=9))  # non-refresh step 10
        cases.append(Case(proj, "left", scale_type="tensor", spike=9, scale=4.0))
        cases.append(Case(proj, "std", spike=9, limiter=False))
        cases.append(Case(proj, "std", scale=100.0, scale_front=True, spike=9, tiny=True))
        cases.append(Case(proj, "std", scale=100.0, spike=9, tiny=True))
        # APOLLO-Mini: rank 1, tensor-wise, scale 128 (the official recommendation)
        cases.append(Case(proj, "std", 1, "tensor", scale=128.0, mini=True))
        cases.append(Case(proj, "std", 1, "tensor", 128.0, scale_front=True, spike=9, mini=True))
        cases.append(Case(proj, "std", 1, "tensor", 128.0, True, spike=9, tiny=True, mini=True))
        cases.append(Case(proj, "reverse_std", 1, "tensor", 128.0, weight_decay=0.1, mini=True))
    cases.append(Case("svd", "std", rank=64))  # rank >= min(m, n): the whole side
    cases.append(Case("svd", "right", rank=64, scale_type="tensor"))
    return [
        c
        for c in cases
        if any(official_supported(s, c.proj_type, c.scale_type) for s in MATRICES.values())
    ]


CASES = _cases()


def _parity_params():
    """The first case of each (projection, APOLLO / APOLLO-Mini) in the fast tier."""
    seen, out = set(), []
    for c in CASES:
        group = (c.proj, c.mini)
        out.append(pytest.param(c, id=c.id, marks=() if group not in seen else pytest.mark.slow))
        seen.add(group)
    return out


def _problem(case: Case):
    shapes = {
        name: s
        for name, s in MATRICES.items()
        if official_supported(s, case.proj_type, case.scale_type)
    }
    projected = sorted(shapes)
    shapes.update(PLAIN)
    spike = None if case.spike is None else (case.spike, SPIKE, "burst")
    w0, grads = make_problem(shapes, STEPS, SEED, spike=spike)
    if case.tiny:
        w0 = {name: np.zeros_like(w) for name, w in w0.items()}
        grads = [
            {n: (g * np.float32(1e-12)).astype(np.float32) for n, g in gs.items()} for gs in grads
        ]
    return w0, grads, projected


def run_case(case: Case, **override) -> dict:
    """The official and our run of one case; `override` changes ours only (power checks)."""
    w0, grads, projected = _problem(case)
    lr = case.learning_rate()
    hyper = dict(
        rank=case.rank,
        update_proj_gap=GAP,
        scale=case.scale,
        proj_type=case.proj_type,
        weight_decay=case.weight_decay,
        projected=set(projected),
    )
    record, tables = projection_recorder(projected, GAP)
    memory: list[dict[str, float | None]] = []

    def on_step(t, opt, params):
        record(t, opt, params)
        memory.append({n: opt.state[params[n]].get("scaled_grad") for n in projected})

    official = run_official(
        "apollo",
        w0,
        grads,
        learning_rates(lr, STEPS),
        proj=case.proj,
        scale_type=case.scale_type,
        scale_front=case.scale_front,
        disable_nl=not case.limiter,
        on_step=on_step,
        **hyper,
    )
    ours_options = dict(
        refresh="svd" if case.proj == "svd" else replay_refresh(tables, GAP),
        scale_front=case.scale_front,
        gamma=1.01 if case.limiter else None,
    )
    if not case.mini:
        ours_options["scale_type"] = case.scale_type
    ours_options.update(override)
    kind = "apollo_mini" if case.mini else "apollo"
    ours = run_ours(kind, w0, grads, lr, **hyper, **ours_options)
    return {
        "errors": relative_errors(ours, official, w0),
        "memory": memory,
        "projected": projected,
        "tables": tables,
    }


@pytest.mark.parametrize("case", _parity_params())
def test_parity_with_official(case: Case):
    res = run_case(case)
    errors = res["errors"]
    print(f"\n{case.id}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{case.id}: parity error above {TOL:g}: {bad} (all: {errors})"

    refreshes = -(-STEPS // GAP)
    assert all(len(res["tables"][n]) == refreshes for n in res["projected"]), res["tables"]
    memory = res["memory"]
    for name in res["projected"]:
        if not case.limiter:  # disable_nl: no limiter state at all
            assert all(step[name] is None for step in memory)
            continue
        # Steps on which the official limiter engaged: λ > 1 leaves the memory at exactly
        # γ·(g + 1e-8), g the memory before.
        engaged = {
            t
            for t in range(1, STEPS)
            if float(memory[t][name])
            == pytest.approx(1.01 * (float(memory[t - 1][name]) + 1e-8), rel=1e-5)
        }
        assert engaged, name  # parity covers limited steps
        if case.spike is not None and (case.proj == "svd" or case.tiny):
            # A burst lands mostly outside the SVD subspace: ‖R‖ grows less than ‖G‖, so
            # ‖φ ⊙ G‖ jumps (tiny: ‖S‖ jumps from below to above the limiter's 1e-8). With a
            # random projection ‖R‖ tracks ‖G‖ and ‖φ ⊙ G‖ tracks ‖N‖, which a burst does
            # not raise: there the limiter engages on early and refresh steps.
            assert case.spike in engaged, (name, sorted(engaged))


@pytest.mark.parametrize(
    "case, override",
    [
        (Case("random", "std", scale=100.0, scale_front=True, spike=9, tiny=True), "front"),
        (Case("random", "std", spike=9), "limiter"),
        (Case("random", "std", scale_type="tensor"), "scale_type"),
        (Case("svd", "std", 1, "tensor", 128.0, True, spike=9, tiny=True, mini=True), "front"),
    ],
    ids=lambda x: x if isinstance(x, str) else x.id,
)
def test_parity_cases_can_fail(case: Case, override: str):
    """Each option the parity cases cover changes the trajectory beyond the tolerance: ours
    with the option flipped is far from the official run. The scale_front case needs ‖S‖
    near the limiter's 1e-8 (gradients × 1e-12), where `√scale` before or after it differs."""
    flipped = {
        "front": {"scale_front": not case.scale_front},
        "limiter": {"gamma": None},
        "scale_type": {"scale_type": "channel"},
    }[override]
    errors = run_case(case, **flipped)["errors"]
    assert max(errors[n] for n in MATRICES if n in errors) > 10 * TOL, errors


def test_parity_with_idle_steps():
    """A matrix idle (exactly zero gradient: PyTorch's `grad=None`) for its first two steps
    and another in mid-run: no step, no weight decay, no refresh, and the first step of the
    limiter and the refresh schedule counted per matrix, as the official code counts them."""
    shapes = dict(MATRICES, **PLAIN)
    w0, grads = make_problem(shapes, STEPS, SEED, spike=(12, SPIKE, "burst"))
    idle = {"wide": (0, 1), "tall": (7, 8, 9)}
    for name, steps in idle.items():
        for t in steps:
            grads[t][name] = np.zeros_like(grads[t][name])
    projected = sorted(MATRICES)
    hyper = dict(rank=4, update_proj_gap=GAP, scale=2.0, weight_decay=0.1, projected=set(projected))
    record, tables = projection_recorder(projected, GAP)
    official = run_official(
        "apollo", w0, grads, [1e-2] * STEPS, proj="random", on_step=record, **hyper
    )
    ours = run_ours("apollo", w0, grads, 1e-2, refresh=replay_refresh(tables, GAP), **hyper)
    errors = relative_errors(ours, official, w0)
    assert max(errors.values()) <= TOL, errors
    for name, steps in idle.items():
        for t in steps:
            before = w0 if t == 0 else ours[t - 1]
            np.testing.assert_array_equal(ours[t][name], before[name])


def test_official_channel_rule_off_the_std_side():
    """The documented difference: off the "std" side the official channel scale reduces the
    wrong axis of R — a crash for k > 1, the tensor-wise scale for k = 1."""
    w0, grads = make_problem({"m": (48, 24)}, 2, SEED)
    run = lambda rank, scale_type: run_official(
        "apollo",
        w0,
        grads,
        [1e-2] * 2,
        rank=rank,
        update_proj_gap=GAP,
        proj_type="left",
        projected={"m"},
        proj="svd",
        scale_type=scale_type,
    )
    with pytest.raises(RuntimeError):
        run(8, "channel")
    channel, tensor = run(1, "channel"), run(1, "tensor")
    # Two reductions (over an axis, over the whole matrix) of the same values: equal up to
    # float32 round-off of the sum; a channel-wise scale would differ by O(1).
    np.testing.assert_allclose(channel[-1]["m"], tensor[-1]["m"], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# The random projection ("random"): APOLLO's N(0, 1/k) Gaussian
# --------------------------------------------------------------------------------------
RANDOM_RANK = 64
RANDOM_SHAPES = {"a": (512, 256), "b": (512, 256), "stack": (2, 256, 128)}
# Each right-side basis of "a" / "b" is 64 × 256 = 16384 i.i.d. entries, each matrix of the
# stack 64 × 128 = 8192. With N entries of variance σ² = 1/k the sample mean has standard
# deviation σ/√N, the sample variance (relative) √(2/N), the sample kurtosis √(24/N), the
# correlation of two independent draws 1/√N: every bound below is 5 of those standard
# deviations (a false alarm ~6e-7 per check) — and far below what a wrong draw gives
# (a missing 1/√k: variance ×64; uniform or ±1 entries: kurtosis 1.8 or 1; a reused key:
# correlation 1).
Z = 5.0


def _random_bases(seed: int, steps: int, grad_seed: int = 0) -> list[dict]:
    tx = fo.project(
        fo.ProjectionSpec(RANDOM_RANK), update_proj_gap=GAP, refresh="random", seed=seed
    )
    params = {name: jnp.zeros(shape) for name, shape in RANDOM_SHAPES.items()}
    state = tx.init(params)
    update = jax.jit(lambda g, s: tx.update(g, s)[1])  # the state (the nodes are no arrays)
    key = jax.random.key(grad_seed)
    out = []
    for t in range(steps):
        grads = {
            name: jax.random.normal(jax.random.fold_in(key, 10 * t + i), shape)
            for i, (name, shape) in enumerate(RANDOM_SHAPES.items())
        }
        state = update(grads, state)
        out.append(jax.tree.map(np.asarray, state.bases))
    return out


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    return float(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)))


@pytest.fixture(scope="module")
def random_bases():
    return _random_bases(seed=0, steps=2 * GAP + 1)


def test_random_projection_is_gaussian_with_variance_one_over_k(random_bases):
    k = RANDOM_RANK
    for refresh in (0, GAP, 2 * GAP):
        for name, bases in random_bases[refresh].items():
            for basis in bases.reshape(-1, *bases.shape[-2:]):
                assert basis.shape == (k, RANDOM_SHAPES[name][-1])  # right side, k×n
                x = basis.astype(np.float64).ravel()
                n = x.size
                z_mean = x.mean() * np.sqrt(n * k)
                var_ratio = x.var() * k
                kurtosis = np.mean((x - x.mean()) ** 4) / x.var() ** 2
                assert abs(z_mean) < Z, (name, refresh, z_mean)
                assert abs(var_ratio - 1) < Z * np.sqrt(2 / n), (name, refresh, var_ratio)
                assert abs(kurtosis - 3) < Z * np.sqrt(24 / n), (name, refresh, kurtosis)


def test_random_projection_is_redrawn_at_every_refresh_only(random_bases):
    for name in RANDOM_SHAPES:
        for t in range(len(random_bases)):
            current, first_of_window = random_bases[t][name], random_bases[t - t % GAP][name]
            np.testing.assert_array_equal(current, first_of_window)  # kept within a window
        for a, b in [(0, GAP), (GAP, 2 * GAP), (0, 2 * GAP)]:
            x, y = random_bases[a][name], random_bases[b][name]
            assert abs(_corr(x, y)) < Z / np.sqrt(x.size), (name, a, b)


def test_random_projection_differs_per_leaf_and_per_matrix(random_bases):
    bases = random_bases[0]
    x, y = bases["a"], bases["b"]  # same shape, other key path
    assert abs(_corr(x, y)) < Z / np.sqrt(x.size)
    s0, s1 = bases["stack"]
    assert abs(_corr(s0, s1)) < Z / np.sqrt(s0.size)


def test_random_projection_is_reproducible_per_seed_and_data_free(random_bases):
    again = _random_bases(seed=0, steps=GAP + 1, grad_seed=1)  # other gradients
    other = _random_bases(seed=1, steps=GAP + 1)
    for t in (0, GAP):
        for name in RANDOM_SHAPES:
            np.testing.assert_array_equal(again[t][name], random_bases[t][name])
            x, y = other[t][name], random_bases[t][name]
            assert abs(_corr(x, y)) < Z / np.sqrt(x.size), (name, t)


# --------------------------------------------------------------------------------------
# The blocks, the state, and the optax contract
# --------------------------------------------------------------------------------------
def _params():
    rng = np.random.default_rng(0)
    return {
        "attn": {"q": {"kernel": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)}},
        "mlp": {"up": {"kernel": jnp.asarray(rng.normal(size=(16, 48)), jnp.float32)}},
        "norm": {"scale": jnp.ones(16)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
    }


def _grads(t: int, params):
    key = jax.random.fold_in(jax.random.key(7), t)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )


def _run(tx, params, steps=2 * GAP, grads=_grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for t in range(steps):
        updates, state = update(grads(t, params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


def test_scale_by_apollo_is_the_block_chain():
    params = _params()
    spec = fo.ProjectionSpec(rank=4)
    chain = optax.chain(
        optax.chain(
            fo.project(spec=spec, update_proj_gap=GAP, refresh="random", seed=3),
            fo.scale_by_low_rank_adam(spec),
            fo.norm_scale_gradient("tensor", scale=8.0, scale_front=True),
            fo.limit_norm_growth(spec, 1.05),
            fo.project_back(),
        ),
        fo.scale_by_learning_rate_and_decay(1e-2),
    )
    alias = fo.apollo(
        1e-2,
        4,
        update_proj_gap=GAP,
        scale=8.0,
        scale_type="tensor",
        scale_front=True,
        gamma=1.05,
        seed=3,
    )
    ours, _ = _run(alias, params)
    blocks, _ = _run(chain, params)
    chex.assert_trees_all_close(ours, blocks, rtol=1e-6, atol=1e-7)


def test_update_is_scaled_gradient_without_back_projection():
    """One step from fresh state, no limiter (first step): the update of a projected matrix is
    `−lr·bc·√scale·φ ⊙ G` with φ over R's rank axis — computed here from R and N by hand —
    and the node's update needs no second matmul: the jaxpr of `scale_by_apollo` has one
    `dot_general` per projected matrix (the projection R), where Fira's has two."""
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(12, 20)), jnp.float32)}
    grads = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(12, 20)), jnp.float32)}
    mask = {"w": True}
    tx = fo.scale_by_apollo(3, update_proj_gap=GAP, scale=9.0, projected=mask)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    basis = optax.tree_utils.tree_get(state, "bases")["w"]  # wide: left, m×k
    r = basis.T @ grads["w"]  # k×n
    n_dir = 0.1 * r / (jnp.sqrt(0.001 * r**2) + 1e-6)  # Adam's first step, before correction
    phi = jnp.linalg.norm(n_dir, axis=0) / (jnp.linalg.norm(r, axis=0) + 1e-8)  # per column
    bc = np.sqrt(1 - 0.999) / (1 - 0.9)
    expected = bc * 3.0 * phi[None, :] * grads["w"]
    np.testing.assert_allclose(updates["w"], expected, rtol=2e-6, atol=0)

    def dots(tx):
        state = tx.init(params)
        jaxpr = jax.make_jaxpr(tx.update)(grads, state, params)
        return sum(
            eqn.primitive.name == "dot_general" for sub in _subjaxprs(jaxpr.jaxpr) for eqn in sub
        )

    fira = fo.scale_by_fira(3, update_proj_gap=GAP, projected=mask, refresh="random")
    assert dots(tx) == 1
    assert dots(fira) >= 2


def _subjaxprs(jaxpr):
    yield jaxpr.eqns
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _subjaxprs(sub)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("factor", [1.0, 1e20])
def test_limiter_norm_is_the_norm_of_the_scaled_gradient(scale_type, factor):
    """`residual_norm` of an APOLLO node (α = 0, any basis) is ‖φ ⊙ G‖, also when ‖G‖²
    overflows float32 (a gradient × 1e20 under the same φ: the scaled-before-squaring
    fallback)."""
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.normal(size=(2, 16, 24)), jnp.float32)
    chain = optax.chain(
        fo.project(fo.ProjectionSpec(4, projected={"w": True}), refresh="random"),
        fo.scale_by_low_rank_adam(fo.ProjectionSpec(4, projected={"w": True})),
        fo.norm_scale_gradient(scale_type),
    )
    node, _ = chain.update({"w": g}, chain.init({"w": g}))
    node = node["w"].replace(grad=g * factor)
    assert is_low_rank(node) and not node.back_projected
    phi = np.asarray(node.phi, np.float64)
    exact = np.linalg.norm(phi * np.asarray(node.grad, np.float64), axis=(-2, -1))
    assert np.all(np.isfinite(exact))
    np.testing.assert_allclose(residual_norm(node), exact, rtol=2e-6)


def test_huge_gradient_spike_keeps_updates_finite():
    params = _params()

    def grads(t, params):
        g = _grads(t, params)
        return jax.tree.map(lambda x: x * 1e25, g) if t == 4 else g

    history, _ = _run(fo.apollo(1e-2, 4, update_proj_gap=GAP), params, grads=grads)
    chex.assert_tree_all_finite(history)


def test_norm_scale_gradient_order_and_arguments_are_checked():
    params = {"w": jnp.ones((16, 8))}
    mask = {"w": True}
    before_adam = optax.chain(
        fo.project(fo.ProjectionSpec(2, projected=mask)),
        fo.norm_scale_gradient(),
        fo.project_back(),
    )
    with pytest.raises(ValueError, match="norm_scale_gradient: leaf 'w' has no direction"):
        before_adam.update(params, before_adam.init(params))
    twice = optax.chain(
        fo.project(fo.ProjectionSpec(2, projected=mask)),
        fo.scale_by_low_rank_adam(fo.ProjectionSpec(2, projected=mask)),
        fo.norm_scale_gradient(),
        fo.norm_scale_residual(),
        fo.project_back(),
    )
    with pytest.raises(ValueError, match="already has a residual scale"):
        twice.update(params, twice.init(params))
    with pytest.raises(ValueError, match="scale_type"):
        fo.norm_scale_gradient("row")
    with pytest.raises(ValueError, match="scale must be"):
        fo.apollo(1e-2, 4, scale=0.0)


def test_inside_multi_transform_follows_the_whole_tree_run():
    """The projected kernels under `optax.multi_transform` (the other leaves, a kernel
    among them: optax.adamw) follow exactly `fo.apollo(projected=<same labels>)` on the whole
    tree: the masked leaves are skipped, weight decay and the random draws (keyed by each
    leaf's key path and the seed) are the same whichever other leaves the tree holds."""
    params = _params()
    labels = {"attn": {"q": {"kernel": "low"}}, "mlp": {"up": {"kernel": "low"}}}
    labels.update(norm={"scale": "adam"}, head={"kernel": "adam"})
    mask = jax.tree.map(lambda label: label == "low", labels)
    kwargs = dict(update_proj_gap=GAP, scale=2.0, weight_decay=0.1, seed=5)
    multi = optax.multi_transform(
        {"low": fo.apollo(1e-2, 4, **kwargs), "adam": optax.adamw(1e-2)}, labels
    )
    whole = fo.apollo(1e-2, 4, projected=mask, **kwargs)
    ours, _ = _run(multi, params)
    ref, _ = _run(whole, params)
    for a, b in zip(ours, ref, strict=True):
        for path in (("attn", "q"), ("mlp", "up")):
            x, y = a[path[0]][path[1]]["kernel"], b[path[0]][path[1]]["kernel"]
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("limiter", [True, False])
def test_state_bytes_at_rank(rank, limiter):
    """Per projected matrix: the projection (k × the side it keeps), two moments at the
    low-rank shape (k × the other side), an int32 step count and (limiter) one float32
    memory; the plain leaves AdamW's two moments; three int32 counts (project, Adam, the
    learning rate). APOLLO-Mini's state is two vectors and a projection per matrix."""
    d, ffn = 64, 176
    params = {
        "q": jax.ShapeDtypeStruct((d, d), jnp.float32),
        "up": jax.ShapeDtypeStruct((d, ffn), jnp.float32),
        "down": jax.ShapeDtypeStruct((ffn, d), jnp.float32),
        "norm": jax.ShapeDtypeStruct((d,), jnp.float32),
    }
    mask = {"q": True, "up": True, "down": True, "norm": False}
    gamma = 1.01 if limiter else None
    if rank == 1:
        tx = fo.apollo_mini(1e-2, projected=mask, gamma=gamma)
    else:
        tx = fo.apollo(1e-2, rank, projected=mask, gamma=gamma)
    expected = 0
    for m, n in [(d, d), (d, ffn), (ffn, d)]:
        kept, other = (n, m) if m >= n else (m, n)  # std: right if tall/square else left
        expected += 4 * (rank * kept + 2 * rank * other + 1 + int(limiter))
    expected += 4 * 2 * d + 4 * 3
    assert state_bytes(tx, params) == expected
    assert state_bytes(tx, params) < state_bytes(optax.adamw(1e-2), params) / 4


@pytest.mark.slow  # the fast tier injects Fira's (test_contract.py)
@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_inject_hyperparams(name):
    params = _params()
    if name == "apollo":
        factory, static = fo.apollo, ("rank", "update_proj_gap")
        kwargs = dict(rank=4, scale=2.0, gamma=1.05)
    else:
        factory, static = fo.apollo_mini, ("update_proj_gap",)
        kwargs = dict(scale=64.0)
    kwargs.update(learning_rate=1e-2, update_proj_gap=GAP, weight_decay=0.1, seed=2)
    plain = factory(**kwargs)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    ours, _ = _run(plain, params)
    ref, state = _run(injected, params)
    chex.assert_trees_all_close(ours[-1], ref[-1], rtol=1e-5, atol=1e-6)
    assert float(state.hyperparams["scale"]) == kwargs["scale"]
    # A learning rate changed at run time takes effect (no retrace needed).
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, _ = jax.jit(injected.update)(_grads(99, params), state, ref[-1])
    chex.assert_trees_all_close(updates, jax.tree.map(jnp.zeros_like, updates))


def test_docstring_examples():
    result = doctest.testmod(_apollo, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


if __name__ == "__main__":
    import time

    t0 = time.time()
    worst = 0.0
    print(f"{'case':<52} " + " ".join(f"{n:>8}" for n in [*MATRICES, *PLAIN]))
    for c in CASES:
        errors = run_case(c)["errors"]
        worst = max(worst, *errors.values())
        cells = [f"{errors[n]:8.1e}" if n in errors else f"{'-':>8}" for n in [*MATRICES, *PLAIN]]
        print(f"{c.id:<52} " + " ".join(cells))
    print(f"worst {worst:.2e} (tolerance {TOL:g}); {len(CASES)} cases in {time.time() - t0:.0f}s")
