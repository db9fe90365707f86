"""FRUGAL (`fo.frugal`, `fo.state_free_residual`) against the float64 NumPy reference
(`_numpy_reference.run_frugal_reference`), and, where a checkout of the official code is given
(`FRUGAL_OFFICIAL_DIR`, see `run_official_frugal`), against that code; plus the contracts:
stateless state-free step, jit, `multi_transform`, `inject_hyperparams`, idle matrices, the
limiter's refusal of a sign residual, training.

Metric (per leaf, as in tests/test_parity.py): max over steps and entries of |W - W_ref|
divided by max |W_ref_final - W0|.

Two discontinuities of the maths make a float32 run depend on its round-off unless the data
keeps away from them, so the gradient sequences are checked for it (in float64) before use:

* `sign(E)`, `E = G - back(R)`: an entry of `E` within round-off of 0 takes either sign. The
  float32 bases of two SVD implementations differ by ~3e-6 of max |G|, and on realistic
  gradients the smallest |E| is of that size, so the sign rule runs on `split_gradients`,
  whose top-k subspace is fixed and whose residual entries are all away from 0.
* Adam's first step after a reset, `N = R / (|R| + eps)`, is `sign(R)`: every refresh step
  (with `reset_statistics`) needs `|R|` away from 0 too.
"""

from __future__ import annotations

import doctest
import importlib
import math
import os
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _harness import _FAST_COMPILE, learning_rates, relative_errors
from _numpy_reference import canonical_basis, projection_side, run_frugal_reference
from optax.tree_utils import tree_get

import fira_optax as fo
from fira_optax import _frugal, _schedule
from fira_optax._testing import make_problem, matrix_problem, random_gradients, state_bytes

STEPS = 24
GAP = 6  # refreshes at steps 1, 7, 13, 19
SEED = 0
LR = 1e-2
MATRICES = {"tall": (48, 24), "wide": (24, 48), "square": (24, 24)}
PLAIN = {"bias": (24,), "dense": (16, 24)}  # never projected
# ours (float32) vs the float64 reference: as in tests/test_numpy_reference.py.
TOL_REF = 5e-5
TOL_OFFICIAL = 1e-4  # float32 vs float32, as in tests/test_parity.py
TOL_OFFICIAL_F64 = 1e-9  # the official code in float64 vs the reference
# The data's distance from the discontinuities (relative to max |G|); see the module docstring.
MIN_RESIDUAL = 1e-3  # ~300x the float32 bases' disagreement (3e-6)
MIN_LOW_RANK = 5e-5


# ---------------------------------------------------------------------------------------
# Gradient sequences
# ---------------------------------------------------------------------------------------
def split_gradients(m: int, n: int, k: int, steps: int, seed: int) -> list[np.ndarray]:
    """`G_t = A_t + E_t` (m×n, float32) whose top-k subspace `S` is fixed and whose residual
    `E_t = G_t − back(R_t)` has no entry near 0.

    For a right projection (m ≥ n; a left one is built transposed) `S` is a random
    k-dimensional subspace of the rows, `D` an orthonormal basis of its complement; every row
    of `E_t = C_t D` is drawn until none of its entries is below 0.1 of their standard
    deviation, and `A_t = U_t Σ V_t P_S` (singular values 40..20, above `E_t`'s) with `U_t`
    orthogonal to `C_t`'s columns, so that `G_tᵀG_t` splits over `S` and its complement: the
    SVD finds `S` and the residual of any basis of it is exactly `E_t`."""
    left = m < n
    rows, cols = (n, m) if left else (m, n)  # rows ≥ cols, the subspace in the row space
    rng = np.random.default_rng([seed, 17])
    frame = np.linalg.qr(rng.standard_normal((cols, cols)))[0]
    inside, outside = frame[:, :k].T, frame[:, k:].T  # k×cols, (cols−k)×cols
    spread = 0.5 * math.sqrt((cols - k) / cols)  # the standard deviation of E's entries
    out = []
    for _ in range(steps):
        C = np.empty((rows, cols - k))
        for i in range(rows):
            while True:
                C[i] = 0.5 * rng.standard_normal(cols - k)
                if np.abs(C[i] @ outside).min() >= 0.1 * spread:
                    break
        Q = np.linalg.qr(C)[0]
        Z = rng.standard_normal((rows, k))
        U = np.linalg.qr(Z - Q @ (Q.T @ Z))[0]  # orthonormal, orthogonal to C's columns
        V = np.linalg.qr(rng.standard_normal((k, k)))[0]
        G = (U * np.linspace(40.0, 20.0, k)) @ V @ inside + C @ outside
        out.append((G.T if left else G).astype(np.float32))
    return out


def split_problem(rank: int, seed: int):
    """`make_problem`'s layout (weights, per-step gradient dicts) with `split_gradients` for
    the projected matrices."""
    w0, grads = make_problem(PLAIN, STEPS, seed)
    for i, (name, (m, n)) in enumerate(MATRICES.items()):
        rng = np.random.default_rng([seed, 200 + i])
        w0[name] = (0.1 * rng.standard_normal((m, n))).astype(np.float32)
        k = min(rank, m, n)
        for t, g in enumerate(split_gradients(m, n, k, STEPS, seed * 100 + i)):
            grads[t][name] = g
    return w0, grads


def conditioning(grads, names, rank, proj_type, reset):
    """Per projected leaf, in float64 with the reference's bases: the smallest |E| and the
    smallest |R| of a step where Adam restarts (step 1; every refresh with `reset`), each
    relative to max |G| of its step."""
    out = {}
    for name in names:
        m, n = grads[0][name].shape
        side = projection_side(m, n, proj_type)
        k = min(rank, m, n)
        whole = k == (n if side == "right" else m)
        near_e, near_r = math.inf, math.inf
        for t, g in enumerate(grads):
            G = np.asarray(g[name], np.float64)
            scale = np.abs(G).max()
            if t % GAP == 0:
                P = canonical_basis(G, k, side)
            R = P.T @ G if side == "left" else G @ P.T
            E = G - (P @ R if side == "left" else R @ P)
            if not whole:
                near_e = min(near_e, np.abs(E).min() / scale)
            if t == 0 or (reset and t % GAP == 0):
                near_r = min(near_r, np.abs(R).min() / scale)
        out[name] = (near_e, near_r)
    return out


# ---------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------
def run_ours(w0, grads, learning_rate, *, projected, **hyper):
    """fo.frugal in float32 (one jit per call); the weights after every step."""
    mask = {name: name in projected for name in w0}
    tx = fo.frugal(learning_rate, projected=mask, **hyper)

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, compiler_options=_FAST_COMPILE)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in w0.items()}
    state = tx.init(params)
    history = []
    for g in grads:
        params, state = step(params, state, {k: jnp.asarray(v) for k, v in g.items()})
        history.append({k: np.asarray(v) for k, v in params.items()})
    return history


OFFICIAL_DIR = os.environ.get("FRUGAL_OFFICIAL_DIR")
needs_official = pytest.mark.skipif(
    not (OFFICIAL_DIR and (Path(OFFICIAL_DIR) / "frugal" / "proj_optimizer_templates.py").exists()),
    reason="set FRUGAL_OFFICIAL_DIR to a checkout of the official FRUGAL code (its frugal/ "
    "package; not on PyPI)",
)


def _official_galore_adamw():
    """The official `frugal.GaloreAdamW`, imported from `FRUGAL_OFFICIAL_DIR`. It imports two
    things this torch lacks: `transformers`' `require_version` (stubbed by `_official`, as for
    Fira) and `torch.optim.optimizer._dispatch_sqrt` (removed from torch; its body was a
    square root of a Python float or a tensor)."""
    import _official  # noqa: F401  (installs the transformers / bitsandbytes stubs)
    import torch
    import torch.optim.optimizer as torch_optimizer

    if not hasattr(torch_optimizer, "_dispatch_sqrt"):
        torch_optimizer._dispatch_sqrt = lambda x: (
            x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)
        )
    if "frugal" not in sys.modules:  # the checkout's package `frugal`, loaded from its path
        package = Path(OFFICIAL_DIR) / "frugal"
        module = types.ModuleType("frugal")
        module.__path__ = [str(package)]  # its submodules are found there
        sys.modules["frugal"] = module
        if (package / "__init__.py").exists():
            exec(
                compile((package / "__init__.py").read_text(), package / "__init__.py", "exec"),
                module.__dict__,
            )
    return importlib.import_module("frugal.adamw").GaloreAdamW


def run_official_frugal(
    w0,
    grads,
    lrs,
    *,
    rank,
    update_proj_gap,
    proj_type="std",
    state_free="sign",
    state_free_learning_rate_ratio=1.0,
    reset_statistics=True,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=None,
    projected=(),
    dtype=None,
    svd_dtype=None,
):
    """The official `GaloreAdamW` (FRUGAL with an SVD projection) on the same gradients; the
    weights after every step. Each projected matrix is its own group with `density = k/dim`
    (the official rank is `round(density·dim)`, `dim` the projected side's size)."""
    import _official
    import torch

    GaloreAdamW = _official_galore_adamw()
    dtype = torch.float32 if dtype is None else dtype
    params = {
        n: torch.nn.Parameter(torch.tensor(np.asarray(w), dtype=dtype)) for n, w in w0.items()
    }
    groups = []
    plain = [p for n, p in params.items() if n not in projected]
    if plain:
        groups.append({"params": plain, "is_proj_params": False})
    for name in sorted(projected):
        m, n = w0[name].shape
        side = projection_side(m, n, proj_type)
        dim = n if side == "right" else m
        groups.append(
            {"params": [params[name]], "is_proj_params": True, "density": min(rank, m, n) / dim}
        )
    opt = GaloreAdamW(
        groups,
        update_gap=update_proj_gap,
        reset_statistics=reset_statistics,
        inactive_update_rule={"sign": "sign_sgd", "sgd": "sgd", None: "no"}[state_free],
        inactive_lr_scale=state_free_learning_rate_ratio,
        proj_side=proj_type,
        proj_type="svd",
        lr=float(lrs[0]),
        betas=(b1, b2),
        eps=eps,
        weight_decay=weight_decay or 0.0,
        no_deprecation_warning=True,
    )
    history = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _official.sign_canonical_svd(svd_dtype):
            for g, lr in zip(grads, lrs, strict=True):
                for group in opt.param_groups:
                    group["lr"] = float(lr)
                for name, p in params.items():
                    p.grad = torch.tensor(np.asarray(g[name]), dtype=dtype)
                opt.step()
                history.append({n: p.detach().numpy().copy() for n, p in params.items()})
    finally:
        torch.set_num_threads(threads)
    return history


# ---------------------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------------------
CASES = {
    # id: (data, hyper-parameters); "split": split_problem (sign), "drift": make_problem
    "sign-std-r8-wd": ("split", dict(state_free="sign", weight_decay=0.1)),
    "sign-std-r8-noreset": ("split", dict(state_free="sign", reset_statistics=False)),
    "sign-std-r8-ratio0.1-sched": (
        "split",
        dict(state_free="sign", state_free_learning_rate_ratio=0.1, schedule=True),
    ),
    # eps where its placement (after the bias correction, PyTorch-style) shows
    "sign-std-r8-eps1e-3": ("split", dict(state_free="sign", eps=1e-3)),
    "sgd-std-r8-wd": ("drift", dict(state_free="sgd", weight_decay=0.1)),
    "sgd-std-r8-noreset": ("drift", dict(state_free="sgd", reset_statistics=False)),
    "sgd-left-r8-ratio0.5": ("drift", dict(state_free="sgd", proj_type="left", ratio=0.5)),
    "sgd-right-r8": ("drift", dict(state_free="sgd", proj_type="right")),
    "sgd-reverse_std-r8": ("drift", dict(state_free="sgd", proj_type="reverse_std")),
    "none-std-r8": ("drift", dict(state_free=None)),
    # k = the whole projected side of every matrix: E is round-off; the sign step is zero
    # (the official code takes the sign of the round-off: not compared with it).
    "sign-std-r64-whole": ("drift", dict(state_free="sign", rank=64, reset_statistics=False)),
}
OFFICIAL_SKIP = {"sign-std-r64-whole"}


def _setup(case_id):
    data, hyper = CASES[case_id]
    hyper = dict(hyper)
    rank = hyper.pop("rank", 8)
    schedule = hyper.pop("schedule", False)
    if "ratio" in hyper:
        hyper["state_free_learning_rate_ratio"] = hyper.pop("ratio")
    w0, grads = (
        split_problem(rank, SEED)
        if data == "split"
        else make_problem(MATRICES | PLAIN, STEPS, SEED)
    )
    lr = (
        optax.warmup_cosine_decay_schedule(0.0, 2 * LR, 5, STEPS, end_value=1e-3)
        if schedule
        else LR
    )
    hyper = dict(rank=rank, update_proj_gap=GAP, projected=set(MATRICES), **hyper)
    near = conditioning(
        grads,
        MATRICES,
        rank,
        hyper.get("proj_type", "std"),
        hyper.get("reset_statistics", True),
    )
    for name, (near_e, near_r) in near.items():
        if hyper.get("state_free") == "sign":
            assert near_e > MIN_RESIDUAL, (name, near_e)
        assert near_r > MIN_LOW_RANK, (name, near_r)
    return w0, grads, lr, hyper


def _reference_hyper(hyper):
    ref = dict(hyper)
    ref["ratio"] = ref.pop("state_free_learning_rate_ratio", 1.0)
    ref["weight_decay"] = ref.get("weight_decay") or 0.0
    return ref


def _check(case_id, errs, tol):
    print(f"\n{case_id}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{case_id}: error above {tol:g}: {bad} (all: {errs})"


def _fast_first(ids):
    """The first case in the fast tier, the others `slow`."""
    return [pytest.param(c, marks=() if i == 0 else pytest.mark.slow) for i, c in enumerate(ids)]


@pytest.mark.parametrize("case_id", _fast_first(list(CASES)))
def test_matches_float64_reference(case_id):
    w0, grads, lr, hyper = _setup(case_id)
    ref = run_frugal_reference(w0, grads, learning_rates(lr, STEPS), **_reference_hyper(hyper))
    ours = run_ours(w0, grads, lr, **hyper)
    _check(f"ours-vs-ref-{case_id}", relative_errors(ours, ref, w0), TOL_REF)


@needs_official
@pytest.mark.parametrize("case_id", _fast_first([c for c in CASES if c not in OFFICIAL_SKIP]))
def test_matches_official(case_id):
    w0, grads, lr, hyper = _setup(case_id)
    official = run_official_frugal(w0, grads, learning_rates(lr, STEPS), **hyper)
    ours = run_ours(w0, grads, lr, **hyper)
    _check(f"ours-vs-official-{case_id}", relative_errors(ours, official, w0), TOL_OFFICIAL)


@needs_official
@pytest.mark.parametrize("case_id", ["sign-std-r8-wd", "sgd-left-r8-ratio0.5", "none-std-r8"])
def test_reference_matches_official_float64(case_id):
    """The reference itself: the official code run in float64 agrees with it to 1e-9."""
    import torch

    w0, grads, lr, hyper = _setup(case_id)
    lrs = learning_rates(lr, STEPS)
    official = run_official_frugal(
        w0, grads, lrs, dtype=torch.float64, svd_dtype=torch.float64, **hyper
    )
    ref = run_frugal_reference(w0, grads, lrs, **_reference_hyper(hyper))
    _check(f"official-f64-vs-ref-{case_id}", relative_errors(official, ref, w0), TOL_OFFICIAL_F64)


def test_sign_step_is_the_sign_of_the_residual():
    """One step: frugal(sign) − frugal(None) is exactly `lr·c·sign(G − back(R))` outside the
    subspace (the basis from the state), and the plain leaves are unaffected."""
    w0, grads = split_problem(8, SEED)
    params = {k: jnp.asarray(v) for k, v in w0.items()}
    g = {k: jnp.asarray(v) for k, v in grads[0].items()}
    mask = {k: k in MATRICES for k in w0}
    kw = dict(rank=8, update_proj_gap=GAP, projected=mask, state_free_learning_rate_ratio=0.3)
    sign_tx, none_tx = fo.frugal(LR, state_free="sign", **kw), fo.frugal(LR, state_free=None, **kw)
    with_sign, state = sign_tx.update(g, sign_tx.init(params), params)
    without, _ = none_tx.update(g, none_tx.init(params), params)
    bases = tree_get(state, "bases")
    for name, (m, n) in MATRICES.items():
        G = np.asarray(g[name], np.float64)
        P = np.asarray(bases[name], np.float64)
        E = G - P @ (P.T @ G) if m < n else G - (G @ P.T) @ P
        np.testing.assert_allclose(
            np.asarray(with_sign[name]) - np.asarray(without[name]),
            -LR * 0.3 * np.sign(E),
            rtol=0,
            atol=1e-7,
        )
    for name in PLAIN:
        np.testing.assert_array_equal(with_sign[name], without[name])


# ---------------------------------------------------------------------------------------
# State, jit, label masks, inject_hyperparams, idle matrices
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_free", ["sign", "sgd"])
@pytest.mark.parametrize("weight_decay", [None, 0.1])
def test_state_free_part_is_stateless(state_free, weight_decay):
    """FRUGAL's state is GaLore's, byte for byte (basis + two low-rank moments per matrix):
    the state-free step stores nothing."""
    params, _ = matrix_problem()
    frugal = fo.frugal(LR, 4, state_free=state_free, weight_decay=weight_decay)
    galore = fo.galore(LR, 4, weight_decay=weight_decay)
    adamw = optax.adamw(LR)
    assert state_bytes(frugal, params) == state_bytes(galore, params)
    assert state_bytes(frugal, params) < state_bytes(adamw, params)


def test_jit_traces_once_across_refreshes():
    params, loss_fn = matrix_problem()
    tx = fo.frugal(LR, 4, update_proj_gap=3, weight_decay=0.1)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(8):  # refreshes at steps 1, 4, 7
        params, state = step(params, state)
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def _updates(tx, params, grads):
    """The updates of `tx` on `grads` (refreshes at steps 1, 4, 7 with a gap of 3)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = update(g, state, params)
        out.append(updates)
    return out


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_in_multi_transform():
    """FRUGAL on the projected leaves, AdamW on the rest: the projected leaves get the updates
    of `fo.frugal(projected=mask)` on the whole tree."""
    params, _ = matrix_problem()
    mask = fo.projected_mask(params, fo.ProjectionSpec(rank=4))
    assert sum(jax.tree.leaves(mask)) == 3
    labels = jax.tree.map(lambda p: "frugal" if p else "adamw", mask)
    kw = dict(update_proj_gap=3, weight_decay=0.1, state_free_learning_rate_ratio=0.5)
    split = optax.multi_transform(
        {"frugal": fo.frugal(LR, 4, **kw), "adamw": optax.adamw(1e-3)}, labels
    )
    whole = fo.frugal(LR, 4, projected=mask, **kw)
    grads = random_gradients(params, 7)
    for a, b in zip(_updates(split, params, grads), _updates(whole, params, grads), strict=True):
        _close(
            {k: v for k, v in a.items() if k != "bias"},
            {k: v for k, v in b.items() if k != "bias"},
        )


@pytest.mark.slow
def test_inject_hyperparams():
    """Every numeric argument injected (traced), `rank`/`update_proj_gap` static: the updates
    of the plain alias; and the injected ratio is live: set to 0, the update is the one
    without a state-free step."""
    params, _ = matrix_problem()
    kw = dict(rank=4, update_proj_gap=3, weight_decay=0.1, state_free_learning_rate_ratio=0.5)
    injected = optax.inject_hyperparams(fo.frugal, static_args=("rank", "update_proj_gap"))(
        learning_rate=LR, **kw
    )
    grads = random_gradients(params, 7)
    _close(_updates(injected, params, grads), _updates(fo.frugal(LR, **kw), params, grads))
    state = injected.init(params)
    state.hyperparams["state_free_learning_rate_ratio"] = jnp.zeros([])
    got, _ = jax.jit(injected.update)(grads[0], state, params)
    plain = fo.frugal(LR, **(kw | {"state_free": None}))
    want, _ = plain.update(grads[0], plain.init(params), params)
    _close(got, want)


def test_idle_matrix_takes_no_step():
    """A step whose gradient is exactly zero is invisible to a projected matrix: no update, no
    weight decay, moments and schedule held; it trains on as if that step had not been."""
    w0, grads = split_problem(8, SEED)
    w0 = {"tall": w0["tall"]}
    seq = [{"tall": g["tall"]} for g in grads[:10]]
    with_idle = seq[:4] + [{"tall": np.zeros_like(seq[0]["tall"])}] + seq[4:]
    hyper = dict(rank=8, update_proj_gap=3, projected={"tall"}, weight_decay=0.1)
    a = run_ours(w0, seq, LR, **hyper)
    b = run_ours(w0, with_idle, LR, **hyper)
    np.testing.assert_array_equal(b[4]["tall"], b[3]["tall"])
    np.testing.assert_allclose(b[-1]["tall"], a[-1]["tall"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("offset, refreshes", [(None, 6), (0, 6), (3, 7), (6, 6)])
def test_basis_age_counts_from_each_refresh(offset, refreshes):
    """The node's basis age (which resets FRUGAL's moments) is 1 exactly on the steps the
    schedule refreshes, and counts up in between, on the official and staggered schedules."""
    gap = 7
    offsets = None if offset is None else np.int32(offset)
    steps = jnp.arange(40, dtype=jnp.int32)  # the steps taken before this one
    due = np.asarray(_schedule.due(steps, gap, offsets))
    age = np.asarray(_schedule.basis_age(steps, gap, offsets))
    assert due[0] and age[0] == 1 and due.sum() == refreshes
    for s in range(1, 40):
        assert age[s] == (1 if due[s] else age[s - 1] + 1), (s, due[s], age[s])


def test_moments_reset_at_each_matrix_own_refresh():
    """With the staggered schedule each matrix restarts its moments at its own refreshes: the
    first moment is `(1 − b1)·R` exactly on those steps (R with the new basis), and only there."""
    w0, grads = split_problem(8, SEED)
    names = ("tall", "square")  # the staggered offsets: tall (the costlier SVD) 0, square 3
    params = {n: jnp.asarray(w0[n]) for n in names}
    mask = {n: True for n in names}
    tx = fo.frugal(LR, 8, update_proj_gap=GAP, projected=mask, refresh_schedule="staggered")
    state = tx.init(params)
    update = jax.jit(tx.update)
    fresh = {n: [] for n in names}
    for g in grads[:14]:
        g = {n: jnp.asarray(g[n]) for n in names}
        _, state = update(g, state, params)
        bases, mus = (
            tree_get(state, "bases"),
            tree_get(state, "mu"),
        )
        for n in names:
            G, P = np.asarray(g[n], np.float64), np.asarray(bases[n], np.float64)
            R = G @ P.T  # both are right projections (m >= n)
            mu = np.asarray(mus[n], np.float64)
            fresh[n].append(bool(np.allclose(mu, 0.1 * R, rtol=0, atol=1e-5 * np.abs(R).max())))
    steps = np.arange(14)
    np.testing.assert_array_equal(fresh["tall"], steps % GAP == 0)
    np.testing.assert_array_equal(fresh["square"], (steps == 0) | (steps % GAP == 3))


# ---------------------------------------------------------------------------------------
# The blocks' contracts
# ---------------------------------------------------------------------------------------
def _chain(*middle, rank=4):
    spec = fo.ProjectionSpec(rank)
    return optax.chain(
        fo.project(spec=spec, update_proj_gap=3),
        *middle,
        fo.project_back(),
    ), spec


def test_limiter_refuses_a_sign_residual_and_takes_an_sgd_one():
    params, loss_fn = matrix_problem()
    grads = jax.grad(loss_fn)(params)
    spec = fo.ProjectionSpec(4)
    adam = fo.scale_by_low_rank_adam(spec, bias_correction="torch")
    sign, _ = _chain(adam, fo.state_free_residual("sign"), fo.limit_norm_growth(spec))
    with pytest.raises(ValueError, match="sign residual"):
        sign.update(grads, sign.init(params), params)
    sgd, _ = _chain(adam, fo.state_free_residual("sgd"), fo.limit_norm_growth(spec))
    updates, _ = sgd.update(grads, sgd.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_block_order_is_checked():
    params, loss_fn = matrix_problem()
    grads = jax.grad(loss_fn)(params)
    spec = fo.ProjectionSpec(4)
    adam = fo.scale_by_low_rank_adam(spec)
    early, _ = _chain(fo.state_free_residual(), adam)
    with pytest.raises(ValueError, match="after the subspace optimizer"):
        early.update(grads, early.init(params), params)
    twice, _ = _chain(adam, fo.norm_scale_residual(), fo.state_free_residual())
    with pytest.raises(ValueError, match="already has a residual"):
        twice.update(grads, twice.init(params), params)


def test_blocks_equal_the_alias():
    params, _ = matrix_problem()
    spec = fo.ProjectionSpec(4)
    blocks = optax.chain(
        fo.project(spec=spec, update_proj_gap=3),
        fo.scale_by_low_rank_adam(spec, eps=1e-8, bias_correction="torch", on_refresh="reset"),
        fo.state_free_residual("sign", 0.5),
        fo.project_back(),
        optax.scale(-LR),
    )
    alias = fo.frugal(LR, 4, update_proj_gap=3, state_free_learning_rate_ratio=0.5)
    grads = random_gradients(params, 7)
    _close(_updates(blocks, params, grads), _updates(alias, params, grads))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fo.state_free_residual("signum"), "Unknown rule"),
        (lambda: fo.state_free_residual("sign", -1.0), "learning_rate_ratio"),
        (lambda: fo.frugal(LR, 4, state_free="lion"), "Unknown state_free"),
        (
            lambda: fo.scale_by_low_rank_adam(fo.ProjectionSpec(4), bias_correction="keras"),
            "bias_correction",
        ),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _train(state_free, steps=150):
    params, loss_fn = matrix_problem()
    tx = fo.frugal(3e-2, 4, update_proj_gap=10, state_free=state_free)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    first = float(loss_fn(params))
    for _ in range(steps):
        params, state = step(params, state)
    return first, float(loss_fn(params))


@pytest.mark.parametrize("state_free", ["sign", pytest.param("sgd", marks=pytest.mark.slow)])
def test_training_loss_decreases(state_free):
    """A least-squares problem at rank 4: the loss falls by more than 100×, and below the run
    without the state-free step (GaLore's update), which leaves the residual untrained."""
    first, last = _train(state_free)
    _, without = _train(None)
    assert last < 0.01 * first and last < 0.5 * without, (first, last, without)


def test_docstring_example():
    result = doctest.testmod(_frugal, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
