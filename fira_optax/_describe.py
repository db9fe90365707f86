"""What a spec does to a param tree: `projected_mask` and the `describe_projection` table."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from fira_optax._shapes import low_rank_state_size
from fira_optax._spec import DimensionNumbersSpec, ProjectedSpec, ProjectionSpec, path_str


def _as_spec(rank, proj_type, projected, dimension_numbers) -> ProjectionSpec:
    if isinstance(rank, ProjectionSpec):
        return rank
    return ProjectionSpec(rank, proj_type, projected, dimension_numbers)


def projected_mask(
    params: Any,
    projected: ProjectedSpec = None,
    *,
    rank: int | ProjectionSpec | None = None,
    proj_type: str = "std",
    dimension_numbers: DimensionNumbersSpec = None,
) -> Any:
    """Resolves `projected` to a pytree of bools shaped like `params`, validated.

    Usable as the labels of `optax.multi_transform` / the mask of `optax.masked`, e.g.
    `labels = jax.tree.map(lambda p: "fira" if p else "adam", fo.projected_mask(params))`.

    Args:
      params: the param tree (arrays or `jax.ShapeDtypeStruct`s).
      projected: None (the default rule), a pytree of bools, a callable `params -> bools` or a
        regex on the '/'-joined key path; see :class:`fira_optax.ProjectionSpec`.
      rank: the rank (or a whole :class:`fira_optax.ProjectionSpec`). Without it the default
        rule skips its size check (a leaf whose low-rank state would not be smaller than
        AdamW's is then still reported as projected).
      proj_type: the side rule (used by the size check).
      dimension_numbers: how leaves are read as matrices.

    Returns:
      A pytree of Python bools with the structure of `params`.

    Raises:
      ValueError: when the mask does not match params, or selects a leaf with fewer than two
        axes or an integer / bool dtype (named in the message).
    """
    if isinstance(rank, ProjectionSpec):
        return rank.mask(params)
    return ProjectionSpec(rank, proj_type, projected, dimension_numbers).mask(params)


def describe_projection(
    params: Any,
    rank: int | ProjectionSpec,
    projected: ProjectedSpec = None,
    proj_type: str = "std",
    *,
    dimension_numbers: DimensionNumbersSpec = None,
) -> str:
    """A table of every leaf: projected or not, its matrix view, side, basis and moment shapes.

    The last line compares the optimizer state of the projected leaves (basis, two low-rank
    moments, one limiter scalar per matrix) with AdamW's two full moments.

    Examples:
      >>> import jax.numpy as jnp, fira_optax as fo
      >>> params = {"embed": jnp.zeros((100, 16)), "mlp": {"up": jnp.zeros((16, 64))},
      ...           "attn": {"kernel": jnp.zeros((16, 2, 8)), "bias": jnp.zeros((2, 8))}}
      >>> print(fo.describe_projection(params, rank=4))  # doctest: +NORMALIZE_WHITESPACE
      leaf         shape       projected  matrix    side   basis    low-rank
      attn/bias    (2, 8)      no         -         -      -        -
      attn/kernel  (16, 2, 8)  yes        16×(2·8)  right  (4, 16)  (16, 4)
      embed        (100, 16)   no         -         -      -        -
      mlp/up       (16, 64)    yes        16×64     left   (16, 4)  (4, 64)
      2 of 4 leaves projected (1280 of 2896 parameters); rank 4, proj_type 'std'
      optimizer state of the projected leaves: 770 elements vs AdamW's 2560 (0.30×)
    """
    spec = _as_spec(rank, proj_type, projected, dimension_numbers)
    flat = jax.tree.leaves_with_path(params)
    plans = spec.flat_plans(params)
    rows = [("leaf", "shape", "projected", "matrix", "side", "basis", "low-rank")]
    n_proj = size_proj = size_all = state = 0
    for (path, leaf), plan in zip(flat, plans, strict=True):
        shape = tuple(np.shape(leaf))
        size = math.prod(shape)
        size_all += size
        if plan is None:
            rows.append((path_str(path), str(shape), "no", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                plan.path,
                str(shape),
                "yes",
                plan.view.describe(),
                plan.side,
                str(plan.basis_shape),
                str(plan.low_rank_shape),
            )
        )
        n_proj += 1
        size_proj += size
        state += low_rank_state_size(plan.view, spec.rank, spec.proj_type)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    summary = (
        f"{n_proj} of {len(flat)} leaves projected ({size_proj} of {size_all} parameters); "
        f"rank {spec.rank}, proj_type {spec.proj_type!r}"
    )
    lines.append(summary)
    if size_proj:
        lines.append(
            f"optimizer state of the projected leaves: {state} elements vs AdamW's "
            f"{2 * size_proj} ({state / (2 * size_proj):.2f}×)"
        )
    return "\n".join(lines)
