"""Exact SVD refresh vs randomized subspace iteration: time and captured gradient energy.

    .venv/bin/python -m benchmarks.refresh [--m 1024 --n 2816 --rank 256 --repeats 10]

A low-rank-plus-noise gradient (decaying spectrum + isotropic noise), jit-compiled and warmed;
prints the median wall time of each method over `--repeats` calls, the speed-up, and the
captured energy `‖Pᵀ G‖² / ‖P_svdᵀ G‖²` of the randomized basis, cold (no previous basis) and
warm (previous basis = the exact basis of a slightly different gradient).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp

from fira_optax import _refresh
from fira_optax._testing import low_rank_gradient as gradient


def energy(basis: jax.Array, g: jax.Array, side: str) -> float:
    r = basis.T @ g if side == "left" else g @ basis.T
    return float(jnp.sum(jnp.square(r)))


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--n", type=int, default=2816)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    m, n, k = args.m, args.n, args.rank
    side = "left" if m < n else "right"  # the "std" rule
    g = jnp.asarray(gradient(m, n, seed=1))
    g_prev = jnp.asarray(gradient(m, n, seed=2, drift=0.05))
    key = jax.random.key(0)

    svd = jax.jit(lambda g: _refresh.svd_basis(g, k, side))
    rnd = jax.jit(lambda g, old: _refresh.randomized_basis(g, old, k, side, key))
    if side == "left":
        zeros = jnp.zeros((m, k), jnp.float32)
    else:
        zeros = jnp.zeros((k, n), jnp.float32)

    exact = svd(g)
    warm_start = svd(g_prev)
    e_exact = energy(exact, g, side)
    e_cold = energy(rnd(g, zeros), g, side) / e_exact
    e_warm = energy(rnd(g, warm_start), g, side) / e_exact
    t_svd = median_time(svd, g, repeats=args.repeats)
    t_rnd = median_time(rnd, g, warm_start, repeats=args.repeats)
    print(f"gradient {m}x{n}, rank {k}, side {side}, {jax.devices()[0].platform}")
    print(f"  oversample={_refresh.OVERSAMPLE} power_iters={_refresh.POWER_ITERS}")
    print(f"  exact SVD      median {1e3 * t_svd:8.1f} ms")
    print(f"  randomized     median {1e3 * t_rnd:8.1f} ms   speed-up {t_svd / t_rnd:5.1f}x")
    print(f"  captured energy vs exact: cold {e_cold:.5f}, warm {e_warm:.5f}")


if __name__ == "__main__":
    main()
