"""Collectives in the compiled sharded fira step, outside and inside the refresh branch.

    .venv/bin/python -m benchmarks.sharding_hlo [layout ...]   (`_testing.llama_layouts()`)

Runs on 8 host CPU devices (2×4 mesh), the small LLaMA of `fira_optax._testing`. The refresh is
a `lax.cond` per projected leaf: a non-refresh step runs the main computation plus the false
branches, a refresh step the main computation plus the true branches. For each, prints the
count of every collective and the shapes it moves. Also times the step with and without refresh
(CPU; indicative only).
"""

from __future__ import annotations

import collections
import sys
import time

import jax
from jax.sharding import NamedSharding

import fira_optax as fo
from fira_optax import _testing

_testing.request_host_devices(8)

COLLECTIVES = _testing.COLLECTIVES


def report(title: str, counter: collections.Counter) -> None:
    by_kind = collections.Counter()
    for (kind, _), c in counter.items():
        by_kind[kind] += c
    print(
        f"  {title}: "
        + (", ".join(f"{k} ×{by_kind[k]}" for k in COLLECTIVES if by_kind[k]) or "none")
    )
    for (kind, shape), c in sorted(counter.items()):
        print(f"      {kind:18s} {shape:40s} ×{c}")


def main() -> None:
    mesh = _testing.llama_mesh()
    tx = _testing.llama_fira()
    for layout in sys.argv[1:] or ["fsdp", "tp", "fsdp_tp", "layer_sharded"]:
        specs = _testing.llama_layouts()[layout]
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        params = jax.device_put(_testing.llama_params(), param_sh)
        state_sh = fo.optimizer_state_shardings(tx, params, param_sh)
        state = jax.jit(tx.init, out_shardings=state_sh)(params)
        step = jax.jit(
            _testing.train_step(tx),
            in_shardings=(param_sh, state_sh, param_sh),
            out_shardings=(param_sh, param_sh, state_sh),
        )
        grads = jax.device_put(_testing.llama_gradients(0), param_sh)
        hlo = step.lower(params, state, grads).compile().as_text()
        print(f"layout {layout}: {dict(jax.tree.map(str, specs)['layers']['mlp'])}")
        report("non-refresh step", _testing.collectives(hlo, 0))
        report("refresh step    ", _testing.collectives(hlo, 1))
        refresh_state = state  # count 0: the next step refreshes
        plain_state = step(params, state, grads)[2]  # count 1: it does not
        for label, st in (("refresh", refresh_state), ("non-refresh", plain_state)):
            jax.block_until_ready(step(params, st, grads))
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                jax.block_until_ready(step(params, st, grads))
                ts.append(time.perf_counter() - t)
            print(f"  {label} step time (CPU, median of 5): {1e3 * sorted(ts)[2]:.1f} ms")


if __name__ == "__main__":
    main()
