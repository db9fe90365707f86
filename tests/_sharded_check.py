"""Sharded Fira/GaLore steps on 8 CPU devices vs one device (run as a subprocess).

`python -m tests._sharded_check [optimizer[:layout,...] ...]` (from the repository root)
prints one JSON line per (optimizer, layout) with:
- `state_max_rel`: the largest, over steps and state leaves, of
  `max|sharded − single| / max|single|`;
- `updates_max_rel`, `updates_frob_rel` (`‖sharded − single‖ / ‖single‖`) of the updates, and
  `updates_frob_rel_after_step1`. Step 1 is special: Adam's first direction is
  `N = 0.1 R / (0.0316 |R| + ε)`, so an entry of `R = Pᵀ G` of size ~ε (a cancellation in the
  projection matmul, whose float32 rounding changes when the contraction is split across
  devices) moves N by up to `0.1 δR / ε`; from step 2 on `√v` is large and N is smooth;
- `sharding_ok` / `bad`: whether every state leaf has the sharding requested by
  `fo.optimizer_state_shardings` after every step (refresh and non-refresh), with the step
  jitted *without* out_shardings (so a silent replication by the partitioner would show);
- `bytes_per_device`: the compiled step's per-device argument/output/temp bytes, sharded and
  single-device.

The tree, its layouts and gradients are `fira_optax._testing`'s small LLaMA; the 8 host
devices are requested here, before jax's backend starts.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding

import fira_optax as fo
from fira_optax import _testing as tu

tu.request_host_devices(8)

RANK, GAP, STEPS = tu.LLAMA_RANK, tu.LLAMA_GAP, tu.LLAMA_STEPS


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "fira": tu.llama_fira(),
        "galore": fo.galore(1e-2, RANK, update_proj_gap=GAP, scale=0.25),
        "fira_randomized": fo.fira(
            1e-2, RANK, update_proj_gap=GAP, scale=0.25, refresh="randomized"
        ),
        "apollo": fo.apollo(1e-2, RANK, update_proj_gap=GAP, weight_decay=0.1),
        "golore": fo.golore(1e-2, RANK, update_proj_gap=GAP, svd_steps=GAP, scale=0.25),
        # "sgd": sign descent flips the sign of near-zero residual entries under another
        # rounding order, a discontinuity no tolerance bounds. No reset: the first step after
        # a reset is Adam's ill-conditioned first step again (N ≈ R / |R|), which the checks
        # bound only at step 1.
        "frugal": fo.frugal(
            1e-2, RANK, update_proj_gap=GAP, state_free="sgd", reset_statistics=False
        ),
    }


def memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    return {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
    }


def rel_diff(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a)))


def run_single(tx):
    """The reference: everything on device 0."""
    dev = jax.devices()[0]
    params = jax.device_put(tu.llama_params(), dev)
    state = jax.jit(tx.init)(params)
    step = jax.jit(tu.train_step(tx))
    compiled = step.lower(params, state, tu.llama_gradients(0)).compile()
    traj = []
    for t in range(STEPS):
        params, updates, state = step(params, state, jax.device_put(tu.llama_gradients(t), dev))
        traj.append(jax.device_get((updates, state)))
    return traj, memory(compiled)


def run_sharded(tx, specs, mesh):
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(tu.llama_params(), param_sh)
    state_sh = fo.optimizer_state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    # No out_shardings: the partitioner decides, so a silent replication would be visible.
    step = jax.jit(tu.train_step(tx), in_shardings=(param_sh, state_sh, param_sh))
    compiled = step.lower(params, state, tu.llama_gradients(0)).compile()
    traj, bad = [], []
    want = jax.tree.leaves(state_sh)
    for t in range(STEPS):
        grads = jax.device_put(tu.llama_gradients(t), param_sh)
        params, updates, state = step(params, state, grads)
        got = jax.tree.leaves(state)
        assert len(got) == len(want)
        paths = [fo._spec.path_str(p) for p, _ in jax.tree.leaves_with_path(state)]
        for path, x, s in zip(paths, got, want, strict=True):
            if not x.sharding.is_equivalent_to(s, x.ndim):
                bad.append(f"step {t + 1} {path}: got {x.sharding.spec}, want {s.spec}")
        for path, x, p in zip(
            [fo._spec.path_str(p) for p, _ in jax.tree.leaves_with_path(params)],
            jax.tree.leaves(params),
            jax.tree.leaves(param_sh),
            strict=True,
        ):
            if not x.sharding.is_equivalent_to(p, x.ndim):
                bad.append(f"step {t + 1} params {path}: got {x.sharding.spec}, want {p.spec}")
        traj.append(jax.device_get((updates, state)))
    return traj, memory(compiled), bad


def frob_rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else float(np.linalg.norm(a))


def compare(traj, ref) -> dict:
    """Worst errors: state leaves (max-relative) and updates (max- and Frobenius-relative)."""
    out = {
        "state_max_rel": 0.0,
        "updates_max_rel": 0.0,
        "updates_frob_rel": 0.0,
        "updates_frob_rel_after_step1": 0.0,
    }
    where = {}
    for t, ((ua, sa), (ub, sb)) in enumerate(zip(traj, ref, strict=True)):
        for (path, x), y in zip(jax.tree.leaves_with_path(sa), jax.tree.leaves(sb), strict=True):
            d = rel_diff(x, y)
            if d > out["state_max_rel"]:
                out["state_max_rel"] = d
                where["state_max_rel"] = f"step {t + 1} {jax.tree_util.keystr(path)}"
        for (path, x), y in zip(jax.tree.leaves_with_path(ua), jax.tree.leaves(ub), strict=True):
            for key, fn in (("updates_max_rel", rel_diff), ("updates_frob_rel", frob_rel)):
                d = fn(x, y)
                if d > out[key]:
                    out[key] = d
                    where[key] = f"step {t + 1} {jax.tree_util.keystr(path)}"
            if t > 0:
                d = frob_rel(x, y)
                out["updates_frob_rel_after_step1"] = max(out["updates_frob_rel_after_step1"], d)
    out["where"] = where
    return out


def main() -> None:
    """Args: `optimizer[:layout,layout...]` (default: every optimizer on every layout)."""
    mesh = tu.llama_mesh()
    jobs = sys.argv[1:] or list(optimizers())
    for job in jobs:
        name, _, which = job.partition(":")
        tx = optimizers()[name]
        ref, mem_single = run_single(tx)
        for layout, specs in tu.llama_layouts().items():
            if which and layout not in which.split(","):
                continue
            traj, mem, bad = run_sharded(tx, specs, mesh)
            result = {"optimizer": name, "layout": layout, "steps": STEPS}
            result.update(compare(traj, ref))
            result.update(
                sharding_ok=not bad,
                bad=bad[:10],
                bytes_per_device={"sharded": mem, "single": mem_single},
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
