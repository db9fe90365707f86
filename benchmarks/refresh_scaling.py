"""The refresh step on a mesh: replicated vs divided, bytes moved, memory; staggered schedule.

    .venv/bin/python -m benchmarks.refresh_scaling [--layers 2 --rank 128 --rounds 7]
        [--window-layers 8 --gap 200] [--skip-window]

On 8 host CPU devices (requested here, before jax's backend starts), LLaMA-60M shapes
(d 512, FFN 1376; q, k, v, o, gate, up, down per layer; 2-D leaves), fira, float32:

1. **Refresh-step time**, every step a refresh (`update_proj_gap=1`), exact SVD and
   randomized: the tree on one device vs FSDP over the 8 devices (every matrix sharded along
   its first axis), replicated refresh (no `refresh_shardings`: every device refreshes every
   matrix) vs divided (`refresh_shardings=`). Rounds are interleaved (each round runs every
   configuration once) so background load hits all alike; medians.
2. **Bytes moved per device**, from the compiled HLO: the collectives of the refresh branch
   and of the non-refresh branch (result bytes of each all-gather / all-to-all /
   collective-permute, operand bytes of each all-reduce; one execution each).
3. **Per-device memory** (`compiled.memory_analysis()`): the full update (its refresh branch
   included) vs the same update with the refresh compiled out (a normal step).
4. **Staggered vs official schedule** on one device, the full 8-layer tree (56 matrices) at
   `update_proj_gap` T: after the first step (every matrix's first basis, both schedules),
   one window of T steps of each, interleaved step by step; max, mean and max/mean step
   time.
5. **On paper** (`--paper`, no devices needed): LLaMA-7B (d 4096, FFN 11008, 32 scanned
   layers, rank 1024, float32 gradients) on 256 chips, the example's layout rule (d over
   `fsdp`, the other axis over `tensor`), pure FSDP (256×1) and FSDP+TP (32×8): bytes each
   device receives per refresh and refresh work per device, replicated vs divided, from the
   library's own placement (`_distributed.layout`, `plan_groups`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fira_optax as fo
from benchmarks.step_time import SIZES
from fira_optax import _project, _testing

_testing.request_host_devices(8)

SCALE, LR = 0.25, 1e-3


def shapes(layers: int) -> dict[str, tuple[int, int]]:
    """The projected matrices of `layers` LLaMA-60M layers (step_time.py's table)."""
    return dataclasses.replace(SIZES["60m"], layers=layers).shapes()


def tree(layers: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes(layers).items()}


# ----------------------------------------------------------------------------------------------
# HLO bytes.


def collective_bytes(hlo: str, branch: int) -> collections.Counter:
    """Bytes per collective kind reachable from ENTRY, taking `branch` at conditionals."""
    out = collections.Counter()
    for (kind, shape), n in _testing.collectives(hlo, branch).items():
        out[kind] += n * _testing.hlo_bytes(shape)
    return out


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


# ----------------------------------------------------------------------------------------------
# 1-3: the refresh step on the mesh.


class Config:
    def __init__(self, name, tx, params, grads, param_sh, state_sh, device=None):
        self.name = name
        if device is not None:
            params = jax.device_put(params, device)
            self.grads = jax.device_put(grads, device)
            self.state = jax.jit(tx.init)(params)
            self.update = jax.jit(tx.update)
        else:
            params = jax.device_put(params, param_sh)
            self.grads = jax.device_put(grads, param_sh)
            self.state = jax.jit(tx.init, out_shardings=state_sh)(params)
            self.update = jax.jit(
                tx.update,
                in_shardings=(param_sh, state_sh, param_sh),
                out_shardings=(param_sh, state_sh),
            )
        self.params = params
        self.compiled = self.update.lower(self.grads, self.state, self.params).compile()
        self.times: list[float] = []
        for _ in range(2):  # warm-up: the first call compiles, the second may re-specialize
            self.run()

    def run(self) -> float:
        t0 = time.perf_counter()
        updates, state = self.update(self.grads, self.state, self.params)
        jax.block_until_ready((updates, state))
        dt = time.perf_counter() - t0
        self.state = state
        return dt


def most_loaded_share(params, param_sh, rank, mesh) -> list[str]:
    """The leaves whose matrices the most-loaded device refreshes (2-D leaves)."""
    from fira_optax import _distributed, _spec

    plans = _spec.ProjectionSpec(rank).flat_plans(params)
    names = [_spec.path_str(p) for p, _ in jax.tree.leaves_with_path(params)]
    mesh_shape = dict(mesh.shape)
    leaves = [
        _distributed.PlacedLeaf(
            plan, _distributed.layout(plan, param_sh[name].spec, mesh_shape), "float32"
        )
        for name, plan in zip(names, plans, strict=True)
    ]
    groups = _distributed.plan_groups(leaves, [[0]] * len(leaves), mesh_shape, "svd")
    owned: dict[int, list[str]] = collections.defaultdict(list)
    load: dict[int, int] = collections.Counter()
    for g in groups:
        for slot, t in enumerate(g.slots):
            if t is not None:
                leaf = g.entries[t][0]
                owner = slot // g.per_owner
                owned[owner].append(names[leaf])
                load[owner] += _refresh_cost(g.key.m, g.key.n, g.key.k, "svd")
    return owned[max(load, key=load.get)]


def memory(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    out = {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def refresh_section(args) -> None:
    devices = jax.devices()
    mesh = Mesh(np.array(devices[:8]), ("fsdp",))
    params, grads = tree(args.layers, 0), tree(args.layers, 1)
    param_sh = {k: NamedSharding(mesh, P("fsdp", None)) for k in params}
    n = len(params)
    numel = sum(v.size for v in params.values())
    print(
        f"## Refresh step: {n} LLaMA-60M matrices ({args.layers} layers, {numel / 1e6:.1f}M "
        f"params), rank {args.rank}, fira, a refresh every step; 8 host CPU devices (FSDP: "
        f"every matrix sharded along its first axis) vs one device; {args.rounds} interleaved "
        "rounds, medians\n"
    )

    def fira(method, gap, shardings=None):
        return fo.fira(
            LR,
            args.rank,
            update_proj_gap=gap,
            scale=SCALE,
            refresh=method,
            refresh_shardings=shardings,
        )

    configs: dict[tuple[str, str], Config] = {}
    normal: dict[str, Config] = {}
    for method in ("svd", "randomized"):
        tx_plain = fira(method, 1)
        tx_div = fira(method, 1, param_sh)
        configs[method, "1 device"] = Config("1", tx_plain, params, grads, None, None, devices[0])
        state_sh = fo.optimizer_state_shardings(tx_plain, params, param_sh)
        configs[method, "8 dev, replicated"] = Config(
            "r", tx_plain, params, grads, param_sh, state_sh
        )
        configs[method, "8 dev, divided"] = Config("d", tx_div, params, grads, param_sh, state_sh)
    # The critical path on 8 real devices: the matrices of the most-loaded device (the
    # library's own placement), refreshed alone on one device.
    busiest = most_loaded_share(params, param_sh, args.rank, mesh)
    sub_p = {k: params[k] for k in busiest}
    sub_g = {k: grads[k] for k in busiest}
    for method in ("svd", "randomized"):
        configs[method, "busiest device's share, 1 device"] = Config(
            "c", fira(method, 1), sub_p, sub_g, None, None, devices[0]
        )
    # Normal steps: a huge gap; the warm-up step (count 0) refreshed, the timed ones do not.
    tx_n = fira("svd", 10**9, param_sh)
    normal["1 device"] = Config("n1", fira("svd", 10**9), params, grads, None, None, devices[0])
    normal["8 dev"] = Config(
        "n8", tx_n, params, grads, param_sh, fo.optimizer_state_shardings(tx_n, params, param_sh)
    )

    for _ in range(args.rounds):
        for cfg in (*configs.values(), *normal.values()):
            cfg.times.append(cfg.run())

    print("| refresh | layout | refresh-step ms | vs 1 device |")
    print("|---|---|---:|---:|")
    layouts = (
        "1 device",
        "8 dev, replicated",
        "8 dev, divided",
        "busiest device's share, 1 device",
    )
    for method in ("svd", "randomized"):
        base = statistics.median(configs[method, "1 device"].times)
        for layout in layouts:
            t = statistics.median(configs[method, layout].times)
            print(f"| {method} | {layout} | {1e3 * t:.1f} | {t / base:.2f}× |")
    for layout, cfg in normal.items():
        print(f"| (normal step) | {layout} | {1e3 * statistics.median(cfg.times):.1f} | |")
    print(
        f"\nThe busiest device refreshes {len(busiest)} of the {n} matrices "
        f"({', '.join(sorted(busiest))}): on 8 chips that run in parallel, its share "
        "is the refresh's critical path."
    )

    print(
        "\n### Bytes moved per device (compiled HLO: result bytes of all-gather / all-to-all / "
        "collective-permute, operand bytes of all-reduce)\n"
    )
    print("| refresh | layout | step | all-gather | all-to-all | all-reduce | other | total |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for method in ("svd", "randomized"):
        for layout in ("8 dev, replicated", "8 dev, divided"):
            hlo = configs[method, layout].compiled.as_text()
            for label, branch in (("refresh", 1), ("normal", 0)):
                c = collective_bytes(hlo, branch)
                other = c["collective-permute"] + c["reduce-scatter"]
                total = sum(c.values())
                print(
                    f"| {method} | {layout} | {label} | {mib(c['all-gather'])} MiB | "
                    f"{mib(c['all-to-all'])} MiB | {mib(c['all-reduce'])} MiB | "
                    f"{mib(other)} MiB | {mib(total)} MiB |"
                )
    grad_bytes = 4 * numel
    print(
        f"\nProjected gradients: {mib(grad_bytes)} MiB in all, {mib(grad_bytes / 8)} MiB per "
        "device (its FSDP shard)."
    )

    # Memory: the normal step = the same update with the refresh compiled out.
    print("\n### Per-device memory (`memory_analysis`, MiB)\n")
    print("| refresh | program | argument | output | temp | peak (arg+out+temp−alias) |")
    print("|---|---|---:|---:|---:|---:|")
    real_refresher = _project.make_refresher
    try:  # a refresher that keeps every basis
        _project.make_refresher = lambda *a, **k: lambda leaves: [leaf.basis for leaf in leaves]
        tx_none = fira("svd", 1, param_sh)
        state_sh = fo.optimizer_state_shardings(tx_none, params, param_sh)
        no_refresh = Config("x", tx_none, params, grads, param_sh, state_sh)
    finally:
        _project.make_refresher = real_refresher
    rows = [("-", "normal step (refresh compiled out)", no_refresh.compiled)]
    for method in ("svd", "randomized"):
        for layout in ("8 dev, replicated", "8 dev, divided"):
            rows.append(
                (method, f"{layout}: update with refresh", configs[method, layout].compiled)
            )
    rows.append(("svd", "1 device: update with refresh", configs["svd", "1 device"].compiled))
    for method, label, compiled in rows:
        m = memory(compiled)
        print(
            f"| {method} | {label} | {mib(m['argument'])} | {mib(m['output'])} | "
            f"{mib(m['temp'])} | {mib(m['peak'])} |"
        )


# ----------------------------------------------------------------------------------------------
# 4: staggered vs official schedule.


def window_section(args) -> None:
    dev = jax.devices()[0]
    params = jax.device_put(tree(args.window_layers, 0), dev)
    grads = jax.device_put(tree(args.window_layers, 1), dev)
    n = len(params)
    print(
        f"\n## Staggered vs official schedule: one device, {n} LLaMA-60M matrices "
        f"({args.window_layers} layers), rank {args.rank}, fira (exact SVD), T = {args.gap}; "
        f"steps 2 … T+1 (one window), the two schedules interleaved step by step\n"
    )
    runners = {}
    for schedule in ("official", "staggered"):
        tx = fo.fira(
            LR, args.rank, update_proj_gap=args.gap, scale=SCALE, refresh_schedule=schedule
        )
        state = jax.jit(tx.init)(params)
        update = jax.jit(tx.update, donate_argnums=(0, 1))
        runners[schedule] = [update, state, []]
        g = jax.tree.map(jnp.copy, grads)
        _, state = update(g, state, params)  # step 1: every first basis
        # Compile the specialization for the update's own output (outside the window).
        copy = jax.tree.map(jnp.copy, (grads, state))
        jax.block_until_ready(update(*copy, params))
        runners[schedule][1] = jax.block_until_ready(state)
    for _ in range(args.gap):
        for runner in runners.values():
            update, state, times = runner
            g = jax.block_until_ready(jax.tree.map(jnp.copy, grads))
            t0 = time.perf_counter()
            updates, state = update(g, state, params)
            jax.block_until_ready((updates, state))
            times.append(time.perf_counter() - t0)
            runner[1] = state
    print("| schedule | mean ms | median ms | max ms | max / mean | steps > 2× median |")
    print("|---|---:|---:|---:|---:|---:|")
    for schedule, (_, _, times) in runners.items():
        mean, med, top = statistics.mean(times), statistics.median(times), max(times)
        slow = sum(t > 2 * med for t in times)
        print(
            f"| {schedule} | {1e3 * mean:.1f} | {1e3 * med:.1f} | {1e3 * top:.1f} | "
            f"{top / mean:.2f} | {slow} |"
        )


# ----------------------------------------------------------------------------------------------
# 5: on paper.


def paper_section() -> None:
    from fira_optax import _distributed, _spec

    d, f, layers, rank = 4096, 11008, 32, 1024
    shapes7b = {
        "layers": {
            "attn": {n: (layers, d, d) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {
                "gate_proj": (layers, d, f),
                "up_proj": (layers, d, f),
                "down_proj": (layers, f, d),
            },
        }
    }
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        shapes7b,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    plans = [p for p in _spec.ProjectionSpec(rank).flat_plans(params)]
    names = [_spec.path_str(path) for path, _ in jax.tree.leaves_with_path(params)]
    total_grad = sum(4 * int(np.prod(p.view.shape)) for p in plans)
    print(
        f"\n## On paper: LLaMA-7B projected matrices (32 layers × q, k, v, o, gate, up, down = "
        f"224 matrices, {total_grad / 4 / 1e9:.2f}B params, float32 gradients "
        f"{total_grad / 1e9:.1f} GB), rank {rank}, 256 chips\n"
    )
    print(
        "| mesh | refresh | received per device per refresh | SVDs per device | "
        "refresh work per device (of one chip doing all) | refresh buffers per device |"
    )
    print("|---|---|---|---:|---:|---|")
    for fsdp, tensor in ((256, 1), (32, 8)):
        mesh_shape = {"fsdp": fsdp, "tensor": tensor}
        leaves = []
        for name, plan in zip(names, plans, strict=True):
            column_parallel = re.search(r"(q|k|v|gate|up)_proj", name)
            rule = ("fsdp", "tensor") if column_parallel else ("tensor", "fsdp")
            spec = P(None, *(a if mesh_shape[a] > 1 else None for a in rule))
            lay = _distributed.layout(plan, spec, mesh_shape)
            leaves.append(_distributed.PlacedLeaf(plan, lay, "float32"))
        members = [list(range(layers))] * len(leaves)
        groups = _distributed.plan_groups(leaves, members, mesh_shape, "svd")
        forward = back = state_bases = 0
        loads = np.zeros(256)
        counts = np.zeros(256, int)
        for g in groups:
            m, n, k = g.key.m, g.key.n, g.key.k
            rows = math.prod(mesh_shape[a] for a in g.key.layout.rows)
            forward += 256 * g.per_owner * (m * n // 256) * 4  # one slot per owner and c
            back += 256 * g.per_owner * (m // rows) * k * 4
            state_bases += sum(1 for t in g.slots if t is not None) * (m // rows) * k * 4
            for slot, t in enumerate(g.slots):
                if t is not None:
                    loads[slot // g.per_owner] += _refresh_cost(m, n, k, "svd")
                    counts[slot // g.per_owner] += 1
        total_cost = sum(_refresh_cost(*_left(p), p.k, "svd") * layers for p in plans)
        share = total_grad / 256
        mesh = f"fsdp={fsdp}, tensor={tensor}"
        print(
            f"| {mesh} | replicated | {(total_grad - share) / 1e9:.1f} GB: every gradient "
            f"(all-gather) | 224 | 1 | one gathered matrix: {4 * d * f / 1e9:.2f} GB |"
        )
        print(
            f"| {mesh} | divided | {(forward + back) / 1e9:.2f} GB: gradient blocks "
            f"{forward / 1e9:.2f} (own shard {share / 1e9:.2f}), bases {back / 1e9:.2f} (the "
            f"state holds {state_bases / 1e9:.2f}) | {counts.max()} | "
            f"1/{total_cost / loads.max():.0f} | ~{(3 * forward + back) / 1e9:.1f} GB (blocks "
            "sent, received, assembled; bases received) |"
        )
    print(
        "\nBoth refresh methods move the same bytes. 'Refresh work': the busiest device's "
        "summed m·n·min(m, n), relative to the sum over all 224 matrices."
    )


def _left(plan):
    m, n = plan.view.m, plan.view.n
    return (m, n) if plan.side == "left" else (n, m)


def _refresh_cost(m, n, k, method):
    from fira_optax._refresh import refresh_cost

    return refresh_cost(m, n, k, method)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--window-layers", type=int, default=8)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--skip-window", action="store_true")
    parser.add_argument("--skip-refresh", action="store_true")
    parser.add_argument("--paper", action="store_true", help="only the on-paper section")
    args = parser.parse_args()
    if args.paper:
        paper_section()
        return
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(affinity {sorted(os.sched_getaffinity(0))}), jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}\n"
    )
    if not args.skip_refresh:
        refresh_section(args)
    if not args.skip_window:
        window_section(args)
    print(f"\nload avg (1/5/15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
