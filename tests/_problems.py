"""The optimizers of the contract suite (`OPTIMIZERS`) and the building-block chain; the
problems are `fira_optax._testing`'s (`matrix_problem`)."""

from __future__ import annotations

import optax

import fira_optax as fo


def block_chain(rank, update_proj_gap, scale, proj_type="std", limiter=True, residual=True):
    """The building-block chain (no learning rate, no weight decay)."""
    spec = fo.ProjectionSpec(rank, proj_type)
    blocks = [
        fo.project(spec, update_proj_gap=update_proj_gap, scale=scale),
        fo.scale_by_low_rank_adam(spec, b1=0.9, b2=0.999, eps=1e-6),
    ]
    if residual:
        blocks.append(fo.norm_scale_residual())
        if limiter:
            blocks.append(fo.limit_norm_growth(spec, gamma=1.01))
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
