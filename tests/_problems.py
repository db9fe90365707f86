"""Small shared problems and optimizer factories for the test suite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fira_optax as fo


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


def block_chain(rank, update_proj_gap, scale, proj_type="std", limiter=True, residual=True):
    """The building-block chain (no learning rate, no weight decay)."""
    blocks = [
        fo.project(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type),
        fo.scale_by_low_rank_adam(b1=0.9, b2=0.999, eps=1e-6, rank=rank, proj_type=proj_type),
    ]
    if residual:
        blocks.append(fo.norm_scale_residual())
        if limiter:
            blocks.append(fo.limit_norm_growth(gamma=1.01))
    blocks.append(fo.project_back())
    return optax.chain(*blocks)


OPTIMIZERS = {
    "fira": lambda: fo.fira(3e-2, rank=4, update_proj_gap=5, scale=0.25),
    "fira_wd": lambda: fo.fira(3e-2, rank=4, update_proj_gap=5, weight_decay=0.1),
    "fira_randomized": lambda: fo.fira(3e-2, rank=4, update_proj_gap=5, refresh="randomized"),
    "galore": lambda: fo.galore(3e-2, rank=4, update_proj_gap=5, scale=0.25),
    "golore": lambda: fo.golore(3e-2, rank=4, update_proj_gap=5, svd_steps=5, scale=0.25),
    "frugal": lambda: fo.frugal(3e-2, rank=4, update_proj_gap=5, weight_decay=0.1),
    "blocks": lambda: optax.chain(block_chain(4, 5, 0.25), optax.scale(-3e-2)),
    "apollo": lambda: fo.apollo(3e-2, rank=4, update_proj_gap=5, weight_decay=0.1),
    "apollo_mini": lambda: fo.apollo_mini(3e-2, update_proj_gap=5, scale_front=True),
}
