"""The divided refresh on 8 CPU devices vs the single-device refresh (run as a subprocess).

`python -m tests._distributed_check method:schedule:layout ...` (from the repository root)
prints one JSON line per case:

- `basis_max_abs`: the largest `|sharded − single|` of any basis entry after any of the steps
  (the bases are orthonormal, entries ≤ 1), both runs fed the same gradients;
- `refreshes`: how many (step, matrix) refreshes the single-device run made (so a case that
  never refreshes cannot pass by accident);
- `refresh_all_gather_width` / `old_refresh_all_gather_width`: over the all-gathers of the
  refresh branch of the compiled step, divided (`refresh_shardings=`) and replicated
  (without), the largest "width" of an all-gathered array — the smaller of its last two
  dimensions: at most the rank for a basis, more for a gradient (`rank`);
- `moved_bytes` / `old_moved_bytes`: per device, the result bytes of the refresh branch's
  all-gathers and all-to-alls, and `grad_bytes_per_device` (the device's share of the
  projected gradients);
- `normal_step_same`: whether the non-refresh branch has the same collectives (kind, shape;
  those of bool scalars aside) as without `refresh_shardings` (the division must not touch
  the normal step);
- `shardings_kept`: every state leaf keeps the sharding `fo.optimizer_state_shardings` asks.

The tree: the small LLaMA of `fira_optax._testing` (stacked `(L, m, n)` kernels) plus a 2-D
kernel and a multi-head `(d, heads, head_dim)` kernel. For the randomized refresh the
gradients have a clear spectral gap at the rank (rank-16 signal, distinct singular values,
1e-3 noise): there the top-k subspace is well determined and the two runs must agree to
float32 round-off at every refresh (on gradients whose trailing basis vectors span pure
noise, round-off rotates those vectors freely from one warm-started refresh to the next).
"""

from __future__ import annotations

import collections
import json
import sys

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fira_optax as fo
from fira_optax import _testing as tu

tu.request_host_devices(8)

RANK, GAP, STEPS = tu.LLAMA_RANK, tu.LLAMA_GAP, tu.LLAMA_STEPS  # refreshes at 1, 4, 7 (official)
DATA, MODEL = tu.DATA, tu.MODEL


def shapes() -> dict:
    tree = tu.llama_shapes()
    tree["adapter"] = (tu.LLAMA_D, tu.LLAMA_F)  # a plain 2-D kernel
    tree["cross_attn"] = {"query": {"kernel": (tu.LLAMA_D, 4, 16)}}  # d × heads·head_dim
    return tree


def layouts() -> dict[str, dict]:
    out = tu.llama_layouts()
    extra = {
        "fsdp": {"adapter": P((DATA, MODEL), None), "kernel": P((DATA, MODEL), None, None)},
        "tp": {"adapter": P(None, MODEL), "kernel": P(None, MODEL, None)},
        "fsdp_tp": {"adapter": P(DATA, MODEL), "kernel": P(DATA, MODEL, None)},
        "layer_sharded": {"adapter": P(None, DATA), "kernel": P(None, DATA, None)},
    }
    for name, specs in out.items():
        specs["adapter"] = extra[name]["adapter"]
        specs["cross_attn"] = {"query": {"kernel": extra[name]["kernel"]}}
    return out


def gradients(step: int, gapped: bool) -> dict:
    """`_testing.llama_gradients`' rank-8-plus-noise gradients, or (`gapped`) per projected matrix a
    rank-16 signal with singular values 4 … 1 plus 1e-3 noise."""
    if not gapped:
        return tu.llama_gradients(step, shapes(), seed=2000)
    rng = np.random.default_rng(2000 + step)
    tree = tu.llama_params(shapes())
    plans = fo.ProjectionSpec(RANK).flat_plans(tree)
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf, plan in zip(leaves, plans, strict=True):
        if plan is None:
            out.append(tu.low_rank_plus_noise(rng, leaf.shape))
            continue
        batch, m, n = plan.batch_shape, plan.view.m, plan.view.n
        r = min(RANK, m, n)
        u = np.linalg.qr(rng.standard_normal((*batch, m, r)))[0]
        v = np.linalg.qr(rng.standard_normal((*batch, n, r)))[0]
        g = (u * np.linspace(4.0, 1.0, r)) @ np.swapaxes(v, -1, -2)
        g = g + 1e-3 * rng.standard_normal((*batch, m, n))
        out.append(np.asarray(plan.view.from_matrix(g.astype(np.float32))))
    return treedef.unflatten(out)


def init_params() -> dict:
    return tu.llama_params(shapes())


def make_tx(method: str, schedule: str, shardings=None):
    return fo.fira(
        1e-2,
        RANK,
        update_proj_gap=GAP,
        scale=0.25,
        refresh=method,
        refresh_schedule=schedule,
        refresh_shardings=shardings,
    )


# ----------------------------------------------------------------------------------------------
# HLO: collectives of the refresh / non-refresh branch.


def summary(counter: collections.Counter) -> dict:
    """The widest all-gathered matrix (the smaller of an array's last two dimensions: the
    rank for a basis, > rank for a gradient) and the bytes all-gathered and all-to-all'ed."""
    widest, moved = 0, 0
    for (kind, shape), count in counter.items():
        if kind not in ("all-gather", "all-to-all"):
            continue
        moved += count * tu.hlo_bytes(shape)
        for _, dims in tu.hlo_arrays(shape):
            if kind == "all-gather" and len(dims) >= 2:
                widest = max(widest, min(dims[-2:]))
    return {"all_gather_width": widest, "moved_bytes": moved}


# ----------------------------------------------------------------------------------------------


def run(method: str, schedule: str, layout: str) -> dict:
    """One case; `layout` `NAME+unit`: the mesh gains a leading size-1 axis no spec names
    (as a `data=1` axis of a `data × fsdp × tensor` mesh)."""
    name, unit = layout.removesuffix("+unit"), layout.endswith("+unit")
    mesh = tu.llama_mesh()
    if unit:
        mesh = Mesh(mesh.devices.reshape(1, *mesh.devices.shape), ("unit", *mesh.axis_names))
    gapped = method == "randomized"
    specs = layouts()[name]
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

    def compiled(tx, params, state_sh):
        step = jax.jit(
            tu.train_step(tx),
            in_shardings=(param_sh, state_sh, param_sh),
            out_shardings=(param_sh, param_sh, state_sh),
        )
        state = jax.jit(tx.init, out_shardings=state_sh)(params)
        return step, state

    # Single device: the reference.
    dev = jax.devices()[0]
    tx1 = make_tx(method, schedule)
    params1 = jax.device_put(init_params(), dev)
    state1 = tx1.init(params1)
    step1 = jax.jit(tu.train_step(tx1))

    # 8 devices, divided.
    tx8 = make_tx(method, schedule, param_sh)
    params8 = jax.device_put(init_params(), param_sh)
    state_sh = fo.optimizer_state_shardings(tx8, params8, param_sh)
    step8, state8 = compiled(tx8, params8, state_sh)
    grads0 = jax.device_put(gradients(0, gapped), param_sh)
    hlo = step8.lower(params8, state8, grads0).compile().as_text()

    # 8 devices, replicated refresh (no layouts): the collectives to compare with.
    tx_old = make_tx(method, schedule)
    step_old, state_old = compiled(
        tx_old, params8, fo.optimizer_state_shardings(tx_old, params8, param_sh)
    )
    hlo_old = step_old.lower(params8, state_old, grads0).compile().as_text()

    new_refresh, old_refresh = summary(tu.collectives(hlo, 1)), summary(tu.collectives(hlo_old, 1))

    def data(counter):  # the collectives that move numbers (not the bool due / flag checks)
        return collections.Counter(
            {k: v for k, v in counter.items() if any(d != "pred" for d, _ in tu.hlo_arrays(k[1]))}
        )

    normal_new, normal_old = data(tu.collectives(hlo, 0)), data(tu.collectives(hlo_old, 0))

    worst, refreshes, bad = 0.0, 0, []
    want = jax.tree.leaves(state_sh)
    for t in range(STEPS):
        g = gradients(t, gapped)
        before = jax.tree.leaves(optax.tree_utils.tree_get(state1, "bases"))
        params1, _, state1 = step1(params1, state1, jax.device_put(g, dev))
        params8, _, state8 = step8(params8, state8, jax.device_put(g, param_sh))
        after = jax.tree.leaves(optax.tree_utils.tree_get(state1, "bases"))
        for a, b in zip(before, after, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            changed = np.any(a != b, axis=(-2, -1))
            refreshes += int(np.sum(changed))
        for a, b in zip(
            after, jax.tree.leaves(optax.tree_utils.tree_get(state8, "bases")), strict=True
        ):
            worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
        for x, s in zip(jax.tree.leaves(state8), want, strict=True):
            if not x.sharding.is_equivalent_to(s, x.ndim):
                bad.append(f"step {t + 1}: {x.shape} {x.sharding.spec} != {s.spec}")

    matrices = [
        (plan.view.m * plan.view.n, plan)
        for plan in fo.ProjectionSpec(RANK).flat_plans(init_params())
        if plan is not None
    ]
    grad_bytes = sum(4 * mn * int(np.prod(plan.batch_shape)) for mn, plan in matrices) // 8
    return {
        "case": f"{method}:{schedule}:{layout}",
        "basis_max_abs": worst,
        "refreshes": refreshes,
        "refresh_all_gather_width": new_refresh["all_gather_width"],
        "old_refresh_all_gather_width": old_refresh["all_gather_width"],
        "rank": RANK,
        "moved_bytes": new_refresh["moved_bytes"],
        "old_moved_bytes": old_refresh["moved_bytes"],
        "grad_bytes_per_device": grad_bytes,
        "normal_step_same": normal_new == normal_old,
        "normal_step_diff": sorted(str(k) for k in (set(normal_new) ^ set(normal_old)))[:6],
        "shardings_kept": not bad,
        "bad": bad[:5],
    }


def main() -> None:
    for job in sys.argv[1:]:
        method, schedule, layout = job.split(":")
        print(json.dumps(run(method, schedule, layout)), flush=True)


if __name__ == "__main__":
    main()
