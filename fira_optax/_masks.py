"""Which leaves of a param tree get the low-rank (projected) step.

`projected` accepts:
- None: the default rule. A leaf is projected when it has ≥ 2 axes and none of the components
  of its key path names an embedding, an output head or a norm (see :data:`EXCLUDED`). This
  selects the attention and MLP kernels of a transformer (q, k, v, o, gate, up, down), as the
  official Fira/GaLore scripts do. Leaves with more than two axes are stacks of matrices over
  their leading axes (scanned layers `(L, m, n)`, experts `(E, m, n)`).
- a pytree of bools with the structure of params;
- a callable `params -> pytree of bools`;
- a regex (str), matched with `re.search` against the '/'-joined key path
  (e.g. `"attn|mlp"`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Union

import jax
import numpy as np

ProjectedSpec = Union[None, str, Callable[[Any], Any], Any]  # noqa: UP007

#: Key-path components (lower-cased) that the default rule never projects.
EXCLUDED = re.compile(
    r"^(.*embed.*|wte|wpe|lm_head|head|output_head|classifier|logits|unembed.*|.*norm.*|ln_.*)$"
)


def path_str(path: tuple[Any, ...]) -> str:
    """'/'-joined key path: `('layers', 0, 'attn', 'q_proj', 'kernel')` -> `layers/0/attn/...`."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
            continue  # flax nnx Variables: `.../kernel/value` reads as `.../kernel`
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _ndim(leaf: Any) -> int:
    return len(np.shape(leaf)) if not hasattr(leaf, "ndim") else leaf.ndim


def default_rule(path: tuple[Any, ...], leaf: Any) -> bool:
    """True for ≥2-D leaves whose path names no embedding, head or norm."""
    if _ndim(leaf) < 2:
        return False
    components = path_str(path).lower().split("/")
    return not any(EXCLUDED.match(c) for c in components)


def projected_mask(params: Any, projected: ProjectedSpec = None) -> Any:
    """Resolves `projected` to a pytree of bools shaped like `params`, validated.

    Args:
      params: the param tree (arrays or `jax.ShapeDtypeStruct`s).
      projected: None (default rule), a pytree of bools, a callable `params -> bools` or a regex
        on the '/'-joined key path.

    Returns:
      A pytree of Python bools with the structure of `params`.

    Raises:
      ValueError: when the mask does not match params, or selects a leaf with fewer than two
        axes (named in the message).
    """
    if projected is None:
        mask = jax.tree.map_with_path(default_rule, params)
    elif isinstance(projected, str):
        pattern = re.compile(projected)
        mask = jax.tree.map_with_path(lambda p, _: bool(pattern.search(path_str(p))), params)
    else:
        mask = projected(params) if callable(projected) else projected
        params_def = jax.tree.structure(params)
        mask_def = jax.tree.structure(mask)
        if params_def != mask_def:
            raise ValueError(
                "projected: the mask tree does not match the params tree.\n"
                f"  params: {params_def}\n  mask:   {mask_def}"
            )

    def check(path, leaf, is_projected):
        is_projected = bool(is_projected)
        if is_projected and _ndim(leaf) < 2:
            raise ValueError(
                f"projected: leaf {path_str(path)!r} has shape {tuple(np.shape(leaf))}; only "
                "leaves with at least two axes (a matrix, or a stack of matrices) can be projected."
            )
        return is_projected

    return jax.tree.map_with_path(check, params, mask)


def describe_projection(
    params: Any,
    rank: int,
    projected: ProjectedSpec = None,
    proj_type: str = "std",
) -> str:
    """A table of every leaf: projected or not, side, basis and moment shapes.

    Examples:
      >>> import jax.numpy as jnp, fira_optax as fo
      >>> params = {"embed": jnp.zeros((100, 16)), "mlp": {"up": jnp.zeros((16, 64))}}
      >>> print(fo.describe_projection(params, rank=8))  # doctest: +NORMALIZE_WHITESPACE
      leaf       shape      projected  side   basis     low-rank
      embed      (100, 16)  no         -      -         -
      mlp/up     (16, 64)   yes        left   (16, 8)   (8, 64)
      1 of 2 leaves projected (1024 of 2624 parameters); rank 8, proj_type 'std'
    """
    from fira_optax import _projection  # local: _projection imports this module

    mask = projected_mask(params, projected)
    flat = jax.tree.leaves_with_path(params)
    mask_leaves = jax.tree.leaves(mask)
    rows = [("leaf", "shape", "projected", "side", "basis", "low-rank")]
    n_proj = size_proj = size_all = 0
    for (path, leaf), is_proj in zip(flat, mask_leaves, strict=True):
        shape = tuple(np.shape(leaf))
        size = int(np.prod(shape))
        size_all += size
        if is_proj:
            side = _projection.side_for_shape(shape, proj_type)
            rows.append(
                (
                    path_str(path),
                    str(shape),
                    "yes",
                    side,
                    str(_projection.basis_shape(shape, rank, side)),
                    str(_projection.low_rank_shape(shape, rank, side)),
                )
            )
            n_proj += 1
            size_proj += size
        else:
            rows.append((path_str(path), str(shape), "no", "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"{n_proj} of {len(flat)} leaves projected ({size_proj} of {size_all} parameters); "
        f"rank {rank}, proj_type {proj_type!r}"
    )
    return "\n".join(lines)
