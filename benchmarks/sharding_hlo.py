"""Collectives in the compiled sharded fira step, outside and inside the refresh branch.

    .venv/bin/python benchmarks/sharding_hlo.py [layout ...]   (layouts of tests/_sharded_check)

Runs on 8 host CPU devices (2×4 mesh). The refresh is a `lax.cond` per projected leaf: a
non-refresh step runs the main computation plus the false branches, a refresh step the main
computation plus the true branches. For each, prints the count of every collective and the
shapes it moves. Also times the step with and without refresh (CPU; indicative only).
"""

from __future__ import annotations

import collections
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _sharded_check as sc
import jax
from jax.sharding import NamedSharding

import fira_optax as fo

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def callees(line: str) -> list[str]:
    out = []
    for key in ("calls", "to_apply", "body", "condition", "true_computation", "false_computation"):
        out += re.findall(rf"{key}=%?([\w.\-]+)", line)
    m = re.search(r"branch_computations=\{([^}]*)\}", line)
    if m:
        out += [c.strip().lstrip("%") for c in m.group(1).split(",")]
    return out


def count(comps, root, branch: int | None) -> collections.Counter:
    """Collectives reachable from `root`; at a conditional follow only `branch` (1 = true)."""
    counter, stack, seen = collections.Counter(), [root], set()
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
                stack += callees(line)
    return counter


def reachable(hlo: str, branch: int) -> collections.Counter:
    """`(kind, shape text)` counts of the collectives reachable from the ENTRY computation of
    compiled `hlo` text, taking `branch` at conditionals (0 = the non-refresh step)."""
    root = re.search(r"ENTRY\s+%?([\w.\-]+)", hlo).group(1)
    return count(computations(hlo), root, branch)


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
    mesh = sc.make_mesh()
    tx = sc.optimizers()["fira"]
    for layout in sys.argv[1:] or ["fsdp", "tp", "fsdp_tp", "layer_sharded"]:
        specs = sc.layouts()[layout]
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        params = jax.device_put(sc.init_params(), param_sh)
        state_sh = fo.optimizer_state_shardings(tx, params, param_sh)
        state = jax.jit(tx.init, out_shardings=state_sh)(params)
        step = jax.jit(
            sc.make_step(tx),
            in_shardings=(param_sh, state_sh, param_sh),
            out_shardings=(param_sh, param_sh, state_sh),
        )
        grads = jax.device_put(sc.gradients(0), param_sh)
        compiled = step.lower(params, state, grads).compile()
        comps = computations(compiled.as_text())
        entry = [line for line in compiled.as_text().splitlines() if line.startswith("ENTRY")]
        root = re.match(r"ENTRY\s+%?([\w.\-]+)", entry[0]).group(1)
        print(f"layout {layout}: {dict(jax.tree.map(str, specs)['layers']['mlp'])}")
        report("non-refresh step", count(comps, root, 0))
        report("refresh step    ", count(comps, root, 1))
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
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
