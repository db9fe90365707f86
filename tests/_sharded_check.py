"""Sharded Fira/GaLore steps on 8 CPU devices vs one device (run as a subprocess).

`python tests/_sharded_check.py [optimizer[:layout,...] ...]` prints one JSON line per
(optimizer, layout) with:
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

The environment (8 host devices, one BLAS thread) is set here, before jax is imported.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fira_optax as fo

# A small LLaMA: vocab V, width D, MLP width F, L stacked (scanned) layers.
V, D, F, L = 128, 64, 160, 4
RANK, GAP, STEPS = 16, 3, 7  # refreshes at steps 1, 4, 7

DATA, MODEL = "data", "model"


def llama_shapes() -> dict:
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


def layouts() -> dict[str, dict]:
    """PartitionSpecs of the params for each layout (2×4 mesh: data=2, model=4)."""
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


def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), (DATA, MODEL))


def low_rank_plus_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient-like: a rank-8 matrix with a decaying spectrum plus 5% noise (per matrix)."""
    if len(shape) < 2:
        return rng.standard_normal(shape).astype(np.float32)
    *batch, m, n = shape
    r = min(8, m, n)
    u = rng.standard_normal((*batch, m, r))
    v = rng.standard_normal((*batch, r, n))
    s = np.linspace(3.0, 1.0, r)
    g = (u * s) @ v / np.sqrt(m * n) + 0.05 * rng.standard_normal(shape) / np.sqrt(max(m, n))
    return g.astype(np.float32)


def gradients(step: int) -> dict:
    rng = np.random.default_rng(1000 + step)
    return jax.tree.map(
        lambda s: low_rank_plus_noise(rng, s),
        llama_shapes(),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_params() -> dict:
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: (0.02 * rng.standard_normal(s)).astype(np.float32),
        llama_shapes(),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "fira": fo.fira(1e-2, RANK, update_proj_gap=GAP, scale=0.25, weight_decay=0.1),
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


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    return step


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
    params = jax.device_put(init_params(), dev)
    state = jax.jit(tx.init)(params)
    step = jax.jit(make_step(tx))
    compiled = step.lower(params, state, gradients(0)).compile()
    traj = []
    for t in range(STEPS):
        params, updates, state = step(params, state, jax.device_put(gradients(t), dev))
        traj.append(jax.device_get((updates, state)))
    return traj, memory(compiled)


def run_sharded(tx, specs, mesh):
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(init_params(), param_sh)
    state_sh = fo.optimizer_state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    # No out_shardings: the partitioner decides, so a silent replication would be visible.
    step = jax.jit(make_step(tx), in_shardings=(param_sh, state_sh, param_sh))
    compiled = step.lower(params, state, gradients(0)).compile()
    traj, bad = [], []
    want = jax.tree.leaves(state_sh)
    for t in range(STEPS):
        grads = jax.device_put(gradients(t), param_sh)
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
    mesh = make_mesh()
    jobs = sys.argv[1:] or list(optimizers())
    for job in jobs:
        name, _, which = job.partition(":")
        tx = optimizers()[name]
        ref, mem_single = run_single(tx)
        for layout, specs in layouts().items():
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
