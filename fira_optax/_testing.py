"""Helpers shared by the test suite and the benchmarks (private: not part of the API).

Shipped with the package like optax's `optax/_src/test_utils.py` so that `tests/` and
`benchmarks/` import one copy (`from fira_optax import _testing`) without touching `sys.path`.
It depends on jax, numpy and optax only; the PyTorch reference code stays in `tests/`
(`tests/_official.py`). No stability promise: names change with the tests.

- **Gradient sequences and problems**: `matrix_gradients` / `leaf_gradients` /
  `make_problem` (the parity cases), `random_gradients` (a tree of Gaussian gradients like the
  params), `low_rank_gradient` (a decaying spectrum plus noise: the refresh benchmark),
  `low_rank_plus_noise`, `matrix_problem` (a least-squares problem), the sparse one-hot MLP
  (`sparse_*`) and the small sharded LLaMA (`llama_*`, its layouts on a 2×4 mesh).
- **Bytes**: `tree_bytes`, `state_bytes`.
- **HLO**: `hlo_computations`, `hlo_entry`, `collectives` (reachable from ENTRY, one branch
  taken at conditionals), `hlo_arrays`, `hlo_bytes`.
- **8 host devices in a subprocess**: `request_host_devices` (in the child, before jax's
  backend starts), `device_check_env`, `run_device_jobs` (`python -m MODULE JOB ...`),
  `run_device_snippet` (`python -c SCRIPT`).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fira_optax as fo

# ----------------------------------------------------------------------------------------------
# Gradient sequences.

# Step-1 conditioning: Adam's first step is N = 0.1 R / (0.0316 |R| + eps), i.e. ~sign(R). An
# entry |R| ~ 1e-5 makes N hypersensitive to float32 rounding of R = P^T G (a property of
# float32 Adam, not of Fira/GaLore), so `matrix_gradients` rejects draws whose projected step-1
# gradient (for both sides and the full basis, which contains every k <= min(m, n)) has such an
# entry. With the O(1) gradients below, |R| >= 3e-4 keeps this effect under ~5e-6 of the
# displacement (about 1 draw in 8 passes; the draws are cheap and deterministic).
_MIN_ABS_ENTRY = 3e-4
NOISE = 0.005  # isotropic noise on top of the designed spectrum (see matrix_gradients)


def _first_step_ok(G: np.ndarray) -> bool:
    """Every entry of `PᵀG` (left) and `G Pᵀ` (right) for the full SVD basis ≥ 3e-4 in size
    (the basis vectors' signs do not change the sizes)."""
    U, _, Vh = np.linalg.svd(np.asarray(G, dtype=np.float64), full_matrices=False)
    return all(np.abs(R).min() >= _MIN_ABS_ENTRY for R in (U.T @ G, G @ Vh.T))


def matrix_gradients(m: int, n: int, steps: int, seed: int) -> list[np.ndarray]:
    """Realistic float32 gradient sequence for one m x n matrix.

    G_t = U_t diag(s) V_t^T + NOISE * noise, with U_t, V_t orthonormalised perturbations of fixed
    random frames (so the dominant subspace drifts over steps) and a spectrum made of 4 dominant
    directions (6 .. 3) plus a decaying tail (2 .. 0.5) instead of an isotropic noise floor: the
    tail keeps the singular gaps at ~0.04 or more (an isotropic noise floor of 0.02 already
    shrinks some to ~0.005), so the bases -- including the full-rank ones used by the
    rank >= min(m, n) cases -- are well defined in float32 and two SVD implementations
    (LAPACK via torch, XLA via JAX) agree on them to ~1e-5.
    Seeds are advanced deterministically until the step-1 gradient is well conditioned (above).
    """
    d = min(m, n)
    r0 = min(4, d)
    s = np.concatenate([np.linspace(6.0, 3.0, r0), np.linspace(2.0, 0.5, d - r0)])
    for attempt in range(1000):
        rng = np.random.default_rng([seed, attempt])
        U0 = rng.standard_normal((m, d))
        V0 = rng.standard_normal((n, d))
        out = []
        for t in range(steps):
            U = np.linalg.qr(U0 + 0.2 * rng.standard_normal((m, d)))[0]
            V = np.linalg.qr(V0 + 0.2 * rng.standard_normal((n, d)))[0]
            G = (U * s) @ V.T + NOISE * rng.standard_normal((m, n))
            out.append(G.astype(np.float32))
            if t == 0 and not _first_step_ok(out[0]):
                break
        else:
            return out
    raise RuntimeError("could not draw a well-conditioned gradient sequence")


def leaf_gradients(shape: tuple[int, ...], steps: int, seed: int) -> list[np.ndarray]:
    """Gradients for a leaf of any shape; >= 2-D leaves are stacks of independent matrices."""
    if len(shape) < 2:
        rng = np.random.default_rng([seed, 7])
        base = rng.standard_normal(shape)
        gs = [base + 0.5 * rng.standard_normal(shape) for _ in range(steps)]
        return [g.astype(np.float32) for g in gs]
    m, n = shape[-2:]
    count = int(np.prod(shape[:-2], dtype=np.int64))
    per = [matrix_gradients(m, n, steps, seed * 1000 + i) for i in range(count)]
    return [np.stack([p[t] for p in per]).reshape(shape) for t in range(steps)]


def make_problem(
    shapes: Mapping[str, tuple[int, ...]],
    steps: int,
    seed: int,
    spike: tuple | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Initial weights and per-step gradients for named leaves.

    ``spike=(t, factor)`` or ``(t, factor, "scale")`` multiplies every gradient of step t
    (0-based) by ``factor``. ``(t, factor, "burst")`` instead adds an isotropic Gaussian burst
    of ``factor`` times the gradient's RMS entry: unlike a pure rescaling (which Fira's
    phi = ||N|| / ||R|| largely cancels), a burst mostly lands outside the low-rank subspace
    and makes the residual norm jump, which is what the norm-growth limiter guards against.
    """
    w0 = {}
    grads: list[dict[str, np.ndarray]] = [{} for _ in range(steps)]
    for i, (name, shape) in enumerate(shapes.items()):
        rng = np.random.default_rng([seed, 100 + i])
        w0[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        for t, g in enumerate(leaf_gradients(shape, steps, seed * 100 + i)):
            grads[t][name] = g
    if spike is not None:
        t_spike, factor, *mode = spike
        mode = mode[0] if mode else "scale"
        rng = np.random.default_rng([seed, 999])
        new = {}
        for k, v in grads[t_spike].items():
            if mode == "scale":
                new[k] = v * np.float32(factor)
            elif mode == "burst":
                rms = np.sqrt(np.mean(np.square(v, dtype=np.float64)))
                new[k] = (v + factor * rms * rng.standard_normal(v.shape)).astype(np.float32)
            else:
                raise ValueError(mode)
        grads[t_spike] = new
    return w0, grads


def random_gradients(params, steps: int, seed: int = 0) -> list:
    """`steps` trees like `params` of independent standard-normal entries (the params' dtypes):
    a fixed sequence with no feedback through a loss, so that two builds of the same maths are
    compared step by step, not through a chaotic trajectory."""
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        for _ in range(steps)
    ]


def low_rank_gradient(m: int, n: int, seed: int, drift: float = 0.0) -> np.ndarray:
    """`U diag(s) Vᵀ + noise`: 64 strong directions over a power-law tail, 1% noise; the frame
    is fixed, `seed` draws the noise and `drift` (a relative size) an extra perturbation."""
    rng = np.random.default_rng(0)
    d = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, d)))
    v, _ = np.linalg.qr(rng.standard_normal((n, d)))
    s = 1.0 / (1.0 + np.arange(d)) ** 0.8
    s[:64] *= 4.0
    g = (u * s) @ v.T
    rng = np.random.default_rng(seed)
    g = g + drift * np.linalg.norm(g) / np.sqrt(m * n) * rng.standard_normal((m, n))
    noise = 0.01 * np.linalg.norm(g) / np.sqrt(m * n) * rng.standard_normal((m, n))
    return (g + noise).astype(np.float32)


def low_rank_plus_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient-like: a rank-8 matrix with a decaying spectrum plus 5% noise (per matrix; a
    vector is standard normal)."""
    if len(shape) < 2:
        return rng.standard_normal(shape).astype(np.float32)
    *batch, m, n = shape
    r = min(8, m, n)
    u = rng.standard_normal((*batch, m, r))
    v = rng.standard_normal((*batch, r, n))
    s = np.linspace(3.0, 1.0, r)
    g = (u * s) @ v / np.sqrt(m * n) + 0.05 * rng.standard_normal(shape) / np.sqrt(max(m, n))
    return g.astype(np.float32)


def matrix_problem(dtype=jnp.float32, seed: int = 0):
    """A least-squares problem on a dict of matrices (projected) and a bias (not projected).

    Returns `(params, loss_fn)`; the minimum loss is 0.
    """
    rng = np.random.default_rng(seed)
    target = {
        "w1": rng.normal(size=(24, 12)),
        "w2": rng.normal(size=(12, 20)),
        "stack": rng.normal(size=(2, 10, 8)),
        "bias": rng.normal(size=(20,)),
    }
    target = jax.tree.map(lambda x: jnp.asarray(x, dtype), target)
    params = jax.tree.map(lambda t: jnp.asarray(0.3 * rng.normal(size=t.shape), dtype), target)
    x = jnp.asarray(rng.normal(size=(32, 24)), dtype)
    z = jnp.asarray(rng.normal(size=(32, 10)), dtype)

    def predict(p):
        return (x @ p["w1"]) @ p["w2"] + p["bias"][None, :], jnp.einsum(
            "bi,lij->lbj", z, p["stack"]
        )

    def loss_fn(p):
        ya, yb = predict(p)
        ta, tb = predict(target)
        return jnp.mean(jnp.square(ya - ta).astype(jnp.float32)) + jnp.mean(
            jnp.square(yb - tb).astype(jnp.float32)
        )

    return params, loss_fn


# ----------------------------------------------------------------------------------------------
# Sparse gradients: a 2-layer MLP on one-hot tokens, one token per step.
#
# The first layer `w1` (16×64) of a one-hot input gets a gradient on one row only (the token's),
# so after a refresh most of its gradients are orthogonal to the rank-2 basis (`R = 0` with
# `G ≠ 0`). The tests and `benchmarks/sparse_gradients.py` train it with ours; `tests/_sparse.py`
# with the official PyTorch code, from the same initial weights and token order.

SPARSE_VOCAB = 16
SPARSE_HIDDEN = 64


def sparse_init_and_data(seed: int = 0, steps: int = 300):
    """`(w0, tokens, targets)`: float32 weights `{"w1", "w2"}` (numpy), one token per step and
    the target class of each token (a fixed random permutation)."""
    rng = np.random.default_rng(seed)
    w0 = {
        "w1": (rng.normal(size=(SPARSE_VOCAB, SPARSE_HIDDEN)) / np.sqrt(SPARSE_VOCAB)).astype(
            np.float32
        ),
        "w2": (rng.normal(size=(SPARSE_HIDDEN, SPARSE_VOCAB)) / np.sqrt(SPARSE_HIDDEN)).astype(
            np.float32
        ),
    }
    tokens = rng.integers(0, SPARSE_VOCAB, size=steps)
    targets = rng.permutation(SPARSE_VOCAB)
    return w0, tokens, targets


def sparse_loss(params, tokens, targets):
    """Mean cross-entropy of `relu(onehot(tokens) @ w1) @ w2` against `targets[tokens]`."""
    x = jax.nn.one_hot(tokens, SPARSE_VOCAB, dtype=params["w1"].dtype)
    logits = jax.nn.relu(x @ params["w1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets[tokens]).mean()


def sparse_train(tx: optax.GradientTransformation, seed: int = 0, steps: int = 300) -> dict:
    """Trains the one-hot MLP with batch 1; returns the per-step gradients and counts.

    Returns a dict: `grads` (the list of per-step gradient trees, numpy), `frozen` (the number
    of steps on which `w1`'s gradient is non-zero but its update exactly zero), `loss` (the
    mean loss over all the tokens at the end), `params` (the final weights).
    """
    w0, tokens, targets = sparse_init_and_data(seed, steps)
    params = jax.tree.map(jnp.asarray, w0)
    targets = jnp.asarray(targets)
    state = tx.init(params)

    @jax.jit
    def step(params, state, token):
        grads = jax.grad(sparse_loss)(params, token[None], targets)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads, updates

    grads_seen, frozen = [], 0
    for token in tokens:
        params, state, grads, updates = step(params, state, jnp.asarray(token))
        grads_seen.append(jax.tree.map(np.asarray, grads))
        if np.any(grads["w1"] != 0) and not np.any(updates["w1"] != 0):
            frozen += 1
    loss = float(sparse_loss(params, jnp.arange(SPARSE_VOCAB), targets))
    return {"grads": grads_seen, "frozen": frozen, "loss": loss, "params": params}


def sparse_gradients(
    shape: tuple[int, int], steps: int, seed: int, nonzero: int = 2, idle: tuple[int, ...] = ()
) -> list[np.ndarray]:
    """Gradients of one m×n matrix that are non-zero on `nonzero` random rows (a wide matrix,
    projected on the left) or columns (a tall one, projected on the right) per step — often
    exactly orthogonal to the basis of the last refresh — and exactly zero on the steps in
    `idle`.
    """
    m, n = shape
    rng = np.random.default_rng([seed, m, n])
    out = []
    for t in range(steps):
        g = np.zeros(shape, np.float32)
        if t not in idle:
            if m < n:
                rows = rng.choice(m, size=nonzero, replace=False)
                g[rows] = rng.standard_normal((nonzero, n))
            else:
                cols = rng.choice(n, size=nonzero, replace=False)
                g[:, cols] = rng.standard_normal((m, nonzero))
        out.append(g)
    return out


def one_hot_rows(steps: int, seed: int) -> list[np.ndarray]:
    """A 4×8 gradient on row 0 at the first step and on row 1 afterwards."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = np.zeros((4, 8), np.float32)
        g[0 if t == 0 else 1] = rng.standard_normal(8)
        out.append(g)
    return out


# ----------------------------------------------------------------------------------------------
# A small LLaMA, sharded on a 2×4 mesh (the 8-device checks and `benchmarks/sharding_hlo.py`).

# Vocab V, width D, MLP width F, L stacked (scanned) layers.
LLAMA_V, LLAMA_D, LLAMA_F, LLAMA_L = 128, 64, 160, 4
LLAMA_RANK, LLAMA_GAP, LLAMA_STEPS = 16, 3, 7  # refreshes at steps 1, 4, 7
DATA, MODEL = "data", "model"


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def llama_shapes() -> dict:
    V, D, F, L = LLAMA_V, LLAMA_D, LLAMA_F, LLAMA_L
    return {
        "embed": (V, D),
        "layers": {
            "attn": {"q": (L, D, D), "k": (L, D, D), "v": (L, D, D), "o": (L, D, D)},
            "mlp": {"gate": (L, D, F), "up": (L, D, F), "down": (L, F, D)},
            "attn_norm": (L, D),
            "mlp_norm": (L, D),
        },
        "final_norm": (D,),
        "lm_head": (D, V),
    }


def llama_layouts() -> dict[str, dict]:
    """PartitionSpecs of the params for each layout (2×4 mesh: data=2, model=4)."""
    P = jax.sharding.PartitionSpec
    fsdp_axes = (DATA, MODEL)
    fsdp = {  # FSDP / ZeRO-3: every matrix sharded along one axis over all 8 devices
        "embed": P(fsdp_axes, None),
        "layers": {
            "attn": {n: P(None, fsdp_axes, None) for n in "qkvo"},
            "mlp": {
                "gate": P(None, fsdp_axes, None),
                "up": P(None, fsdp_axes, None),
                "down": P(None, fsdp_axes, None),
            },
            "attn_norm": P(),
            "mlp_norm": P(),
        },
        "final_norm": P(),
        "lm_head": P(None, fsdp_axes),
    }
    tp = {  # Megatron tensor parallel over "model"; replicated over "data"
        "embed": P(None, MODEL),
        "layers": {
            "attn": {
                "q": P(None, None, MODEL),
                "k": P(None, None, MODEL),
                "v": P(None, None, MODEL),
                "o": P(None, MODEL, None),
            },
            "mlp": {
                "gate": P(None, None, MODEL),
                "up": P(None, None, MODEL),
                "down": P(None, MODEL, None),
            },
            "attn_norm": P(),
            "mlp_norm": P(),
        },
        "final_norm": P(),
        "lm_head": P(None, MODEL),
    }
    fsdp_tp = {  # 2-D: FSDP over "data" on the other axis of each TP-sharded matrix
        "embed": P(DATA, MODEL),
        "layers": {
            "attn": {
                "q": P(None, DATA, MODEL),
                "k": P(None, DATA, MODEL),
                "v": P(None, DATA, MODEL),
                "o": P(None, MODEL, DATA),
            },
            "mlp": {
                "gate": P(None, DATA, MODEL),
                "up": P(None, DATA, MODEL),
                "down": P(None, MODEL, DATA),
            },
            "attn_norm": P(None, DATA),
            "mlp_norm": P(None, DATA),
        },
        "final_norm": P(),
        "lm_head": P(DATA, MODEL),
    }
    layer_sharded = {  # the stacked L axis over "model" (per-layer work spread), TP on "data"
        "embed": P(None, DATA),
        "layers": {
            "attn": {n: P(MODEL, None, DATA) for n in "qkvo"},
            "mlp": {
                "gate": P(MODEL, None, DATA),
                "up": P(MODEL, None, DATA),
                "down": P(MODEL, DATA, None),
            },
            "attn_norm": P(MODEL),
            "mlp_norm": P(MODEL),
        },
        "final_norm": P(),
        "lm_head": P(None, DATA),
    }
    return {"fsdp": fsdp, "tp": tp, "fsdp_tp": fsdp_tp, "layer_sharded": layer_sharded}


def llama_mesh() -> jax.sharding.Mesh:
    """The first 8 devices as a 2×4 `(data, model)` mesh."""
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), (DATA, MODEL))


def llama_gradients(step: int, shapes: dict | None = None, seed: int = 1000) -> dict:
    """`low_rank_plus_noise` gradients of the LLaMA (or of `shapes`) at `step`, drawn from
    `default_rng(seed + step)`."""
    rng = np.random.default_rng(seed + step)
    return jax.tree.map(
        lambda s: low_rank_plus_noise(rng, s),
        llama_shapes() if shapes is None else shapes,
        is_leaf=_is_shape,
    )


def llama_params(shapes: dict | None = None) -> dict:
    """Initial weights (0.02 · standard normal, float32) of the LLaMA (or of `shapes`)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: (0.02 * rng.standard_normal(s)).astype(np.float32),
        llama_shapes() if shapes is None else shapes,
        is_leaf=_is_shape,
    )


def llama_fira() -> optax.GradientTransformation:
    """The Fira of the 8-device checks: rank 16, gap 3, α = 0.25, weight decay 0.1."""
    return fo.fira(1e-2, LLAMA_RANK, update_proj_gap=LLAMA_GAP, scale=0.25, weight_decay=0.1)


def train_step(tx: optax.GradientTransformation):
    """`(params, state, grads) -> (new params, updates, new state)`, not jitted."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    return step


# ----------------------------------------------------------------------------------------------
# Bytes.


def tree_bytes(tree) -> int:
    """Bytes of the array leaves (arrays or `jax.ShapeDtypeStruct`s) of `tree`."""
    return int(
        sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    )


def state_bytes(tx: optax.GradientTransformation, params) -> int:
    """Bytes of `tx.init(params)`, from its shapes (nothing allocated)."""
    return tree_bytes(jax.eval_shape(tx.init, params))


# ----------------------------------------------------------------------------------------------
# HLO text of a compiled computation.

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(pred|s8|u8|s32|u32|f32|bf16|f16)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def hlo_computations(hlo: str) -> dict[str, list[str]]:
    """The body lines of every computation of `hlo`, by name."""
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def hlo_entry(hlo: str) -> str:
    """The name of the ENTRY computation."""
    return re.search(r"ENTRY\s+%?([\w.\-]+)", hlo).group(1)


def _callees(line: str) -> list[str]:
    out = []
    for key in ("calls", "to_apply", "body", "condition", "true_computation", "false_computation"):
        out += re.findall(rf"{key}=%?([\w.\-]+)", line)
    m = re.search(r"branch_computations=\{([^}]*)\}", line)
    if m:
        out += [c.strip().lstrip("%") for c in m.group(1).split(",")]
    return out


def collectives(hlo: str, branch: int) -> collections.Counter:
    """`(kind, shape text)` counts of the collectives reachable from the ENTRY computation of
    compiled `hlo` text, following only `branch` at conditionals (0 = false, 1 = true: for a
    low-rank optimizer's step, the non-refresh and the refresh step)."""
    comps = hlo_computations(hlo)
    counter, stack, seen = collections.Counter(), [hlo_entry(hlo)], set()
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            m = _OP.search(line)
            if m:
                counter[(m.group(2), m.group(1))] += 1
            if " conditional(" in line:
                bm = re.search(r"branch_computations=\{([^}]*)\}", line)
                if bm:
                    branches = [c.strip().lstrip("%") for c in bm.group(1).split(",")]
                else:
                    branches = [
                        re.search(r"false_computation=%?([\w.\-]+)", line).group(1),
                        re.search(r"true_computation=%?([\w.\-]+)", line).group(1),
                    ]
                stack.append(branches[min(branch, len(branches) - 1)])
            else:
                stack += _callees(line)
    return counter


def hlo_arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """`(dtype, dims)` of every array in an HLO shape (a tuple or one array)."""
    return [
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims in _ARRAY.findall(shape_text)
    ]


def hlo_bytes(shape_text: str) -> int:
    """Bytes of the arrays of an HLO shape."""
    return sum(_ITEMSIZE[dtype] * int(np.prod(dims)) for dtype, dims in hlo_arrays(shape_text))


# ----------------------------------------------------------------------------------------------
# 8 host devices in a subprocess.

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def request_host_devices(count: int = 8) -> None:
    """Adds `count` host (CPU) devices to this process's XLA_FLAGS, after the flags already
    there (e.g. `--xla_cpu_max_isa`), with one BLAS thread and the CPU platform. Call it before
    jax's backend starts (before the first `jax.devices()` or computation)."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" {_DEVICE_COUNT_FLAG}={count}"
    ).strip()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def device_check_env(cwd: str | Path | None = None) -> dict[str, str]:
    """The environment of an 8-device check subprocess: one BLAS thread, the CPU platform, and
    this process's XLA_FLAGS (e.g. `--xla_cpu_max_isa`, which picks the vector code) without a
    host device count: the child requests its own (`request_host_devices`). With `cwd`, that
    directory leads the child's PYTHONPATH (so `python -c` finds `tests`)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    flags = [
        flag for flag in env.pop("XLA_FLAGS", "").split() if not flag.startswith(_DEVICE_COUNT_FLAG)
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    if cwd is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), env.get("PYTHONPATH", "")) if p)
    return env


def _run(args: list[str], cwd: str | Path | None, timeout: float) -> str:
    try:
        out = subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=device_check_env(cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.CalledProcessError as e:
        raise AssertionError(e.stderr[-4000:]) from e
    return out.stdout


def run_device_jobs(
    module: str, *jobs: str, cwd: str | Path | None = None, timeout: float = 900
) -> list[dict]:
    """Runs `python -m module JOB ...` in `cwd` (a check that requests its host devices itself)
    and returns the JSON lines it prints; raises `AssertionError` with its stderr's tail when it
    fails."""
    stdout = _run(["-m", module, *jobs], cwd, timeout)
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run_device_snippet(script: str, *, cwd: str | Path | None = None, timeout: float = 600) -> str:
    """Runs `python -c script` (which requests its host devices itself); its stdout."""
    return _run(["-c", script], cwd, timeout)
