"""The optimizer state is really low-rank: exact byte counts on a LLaMA-60M-shaped tree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fira_optax as fo
from fira_optax._testing import state_bytes

D, FFN, LAYERS, VOCAB, RANK = 512, 1376, 8, 32000, 128


def llama_60m_shapes():
    """Abstract params (no allocation) in the JAX kernel layout `(in, out)`."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    layer = {
        "attn": {n: {"kernel": f32(D, D)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {
            "gate_proj": {"kernel": f32(D, FFN)},
            "up_proj": {"kernel": f32(D, FFN)},
            "down_proj": {"kernel": f32(FFN, D)},
        },
        "attn_norm": {"scale": f32(D)},
        "mlp_norm": {"scale": f32(D)},
    }
    return {
        "embed": {"embedding": f32(VOCAB, D)},
        "layers": {str(i): layer for i in range(LAYERS)},
        "final_norm": {"scale": f32(D)},
        "lm_head": {"kernel": f32(D, VOCAB)},
    }


def analytic_fira_bytes(limiter=True, rank=RANK):
    """P (k × kept dim) + two low-rank moments (k × other dim) + one int32 step count (the
    per-matrix bias correction) + one limiter scalar."""
    per_layer = 0
    for m, n in [(D, D)] * 4 + [(D, FFN)] * 2 + [(FFN, D)]:
        k = min(rank, m, n)
        kept, other = (n, m) if m >= n else (m, n)  # std: right if tall/square else left
        per_layer += 4 * (k * kept + 2 * k * other + 1 + (1 if limiter else 0))
    plain = VOCAB * D * 2 + (2 * D) * LAYERS + D
    counts = 4 * 3  # the step counts of project, adam and the learning rate
    return LAYERS * per_layer + 4 * 2 * plain + counts


def test_fira_state_bytes_are_analytic():
    params = llama_60m_shapes()
    assert state_bytes(fo.fira(1e-2, RANK), params) == analytic_fira_bytes()
    assert state_bytes(fo.galore(1e-2, RANK), params) == analytic_fira_bytes(limiter=False)


def test_family_state_bytes_are_analytic():
    """GoLore and FRUGAL keep GaLore's state (FRUGAL's state-free part stores nothing),
    APOLLO Fira's (moments and a limiter memory; no limiter: GaLore's), APOLLO-Mini the
    same at rank 1."""
    params = llama_60m_shapes()
    galore, fira = analytic_fira_bytes(limiter=False), analytic_fira_bytes()
    assert state_bytes(fo.golore(1e-2, RANK), params) == galore
    assert state_bytes(fo.frugal(1e-2, RANK), params) == galore
    assert state_bytes(fo.apollo(1e-2, RANK), params) == fira
    assert state_bytes(fo.apollo(1e-2, RANK, gamma=None), params) == galore
    assert state_bytes(fo.apollo_mini(1e-2), params) == analytic_fira_bytes(rank=1)


def test_fira_state_is_smaller_than_adamw():
    params = llama_60m_shapes()
    fira_bytes = state_bytes(fo.fira(1e-2, RANK), params)
    adamw_bytes = state_bytes(optax.adamw(1e-3), params)
    projected = 4 * sum(
        int(np.prod(x.shape))
        for x in jax.tree.leaves(params)
        if len(x.shape) == 2 and VOCAB not in x.shape
    )
    # AdamW keeps 2 full copies of the projected matrices; Fira keeps P + 2 thin moments.
    assert adamw_bytes - fira_bytes > projected  # saves more than one copy of the matrices
    print(f"state bytes: fira {fira_bytes:,}  adamw {adamw_bytes:,}")


def test_no_state_for_unprojected_leaves_beyond_adam():
    params = {"norm": {"scale": jnp.ones(8)}, "embed": {"embedding": jnp.ones((10, 8))}}
    tx = fo.fira(1e-2, rank=4)
    state = tx.init(params)
    (project_state, adam_state, _, limiter_state, _), _ = state
    assert jax.tree.leaves(project_state.bases) == []
    assert jax.tree.leaves(limiter_state) == []  # the limiter keeps norms only
    assert jax.tree.map(jnp.shape, adam_state.mu) == jax.tree.map(jnp.shape, params)
