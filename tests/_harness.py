"""Shared test helpers: gradient sequences, running fira_optax, the error metric (parity tests);
running an 8-device check script in a subprocess (sharding tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # script mode / plain `pytest` without an installed package
    sys.path.insert(0, str(_ROOT))

from _numpy_reference import canonical_basis  # noqa: E402

# Step-1 conditioning: Adam's first step is N = 0.1 R / (0.0316 |R| + eps), i.e. ~sign(R). An
# entry |R| ~ 1e-5 makes N hypersensitive to float32 rounding of R = P^T G (a property of
# float32 Adam, not of Fira/GaLore), so we reject gradient draws whose projected step-1 gradient
# (for both sides and the full basis, which contains every k <= min(m, n)) has such an entry.
# With the O(1) gradients below, |R| >= 3e-4 keeps this effect under ~5e-6 of the displacement
# (about 1 draw in 8 passes; the draws are cheap and deterministic).
_MIN_ABS_ENTRY = 3e-4
NOISE = 0.005  # isotropic noise on top of the designed spectrum (see matrix_gradients)


def _first_step_ok(G: np.ndarray) -> bool:
    G = np.asarray(G, dtype=np.float64)
    k = min(G.shape)
    for side in ("left", "right"):
        P = canonical_basis(G, k, side)
        R = P.T @ G if side == "left" else G @ P.T
        if np.abs(R).min() < _MIN_ABS_ENTRY:
            return False
    return True


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


def learning_rates(learning_rate: float | Callable, steps: int) -> list[float]:
    """Per-step learning rates; an optax schedule is evaluated at count = 0, 1, ... ."""
    if callable(learning_rate):
        return [float(learning_rate(t)) for t in range(steps)]
    return [float(learning_rate)] * steps


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_ours(
    kind: str,
    w0: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    learning_rate: float | Callable,
    *,
    rank: int,
    update_proj_gap: int,
    scale: float = 1.0,
    proj_type: str = "std",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    gamma: float | None = 1.01,
    projected=(),
    return_states: bool = False,
    **options,
):
    """Run fira_optax (float32, one jit per call); return weights after each step.

    ``kind`` is "fira", "galore", "apollo" or "apollo_mini" (``rank`` must then be 1);
    ``options`` go to ``fo.apollo`` / ``fo.apollo_mini`` (e.g. ``scale_type``,
    ``scale_front``, ``refresh``; ``gamma=None`` turns their limiter off).
    """
    import jax
    import jax.numpy as jnp
    import optax

    import fira_optax as fo

    projected = set(projected)
    mask = {name: name in projected for name in w0}
    kwargs = dict(
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        b1=betas[0],
        b2=betas[1],
        eps=eps,
        weight_decay=weight_decay,
        projected=mask,
    )
    if kind == "fira":
        tx = fo.fira(learning_rate, rank, gamma=gamma, **kwargs)
    elif kind == "galore":
        tx = fo.galore(learning_rate, rank, **kwargs)
    elif kind == "apollo":
        tx = fo.apollo(learning_rate, rank, gamma=gamma, **kwargs, **options)
    elif kind == "apollo_mini" and rank == 1:
        tx = fo.apollo_mini(learning_rate, gamma=gamma, **kwargs, **options)
    else:
        raise ValueError(f"kind {kind!r} (rank {rank})")
    if options and not kind.startswith("apollo"):
        raise ValueError(f"options {sorted(options)} are for fo.apollo / fo.apollo_mini")

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    # XLA's CPU compile of one update (~3 s, the bulk of a case) halves at optimisation level 0;
    # the arithmetic is the same float32 arithmetic. FIRA_PARITY_XLA_OPT=1 keeps the defaults.
    if os.environ.get("FIRA_PARITY_XLA_OPT") == "1":
        step = jax.jit(step)
    else:
        step = jax.jit(step, compiler_options=_FAST_COMPILE)

    params = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in w0.items()}
    state = tx.init(params)
    history, states = [], []
    for g in grads:
        params, state = step(params, state, {k: jnp.asarray(v) for k, v in g.items()})
        history.append({k: np.asarray(v) for k, v in params.items()})
        if return_states:
            states.append(state)
    return (history, states) if return_states else history


def relative_errors(
    ours: Sequence[Mapping[str, np.ndarray]],
    ref: Sequence[Mapping[str, np.ndarray]],
    w0: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Per leaf: max over steps and entries |ours - ref| / max |ref_final - w0|."""
    out = {}
    for name in w0:
        w0_ = np.asarray(w0[name], dtype=np.float64)
        disp = np.abs(np.asarray(ref[-1][name], dtype=np.float64) - w0_).max()
        err = max(
            np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64)).max()
            for a, b in zip(ours, ref, strict=True)
        )
        out[name] = float(err / disp)
    return out


def device_check_env() -> dict[str, str]:
    """The environment of an 8-device check subprocess: one BLAS thread, the CPU platform, and
    this process's XLA_FLAGS (e.g. `--xla_cpu_max_isa`, which picks the vector code) without a
    host device count: the child appends its own `--xla_force_host_platform_device_count`."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    flags = [
        flag
        for flag in env.pop("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_device_jobs(script: Path, *jobs: str, timeout: float = 900) -> list[dict]:
    """Runs `python script JOB ...` (a check that requests its host devices itself, before
    importing jax, on top of this process's other XLA_FLAGS) and returns the JSON lines it
    prints; its stderr tail on failure."""
    try:
        out = subprocess.run(
            [sys.executable, str(script), *jobs],
            env=device_check_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.CalledProcessError as e:
        raise AssertionError(e.stderr[-4000:]) from e
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
