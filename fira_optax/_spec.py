"""One frozen description of the projection, shared by every stateful block.

A :class:`ProjectionSpec` says which leaves are projected (`projected`), how each is read as a
stack of matrices (`dimension_numbers`), at which rank and on which side (`proj_type`).
`project`, the subspace optimizer and the limiter allocate their state from the same spec, so
passing one spec to all of them makes a mismatch impossible. The blocks take the spec as their
first argument (`fo.scale_by_low_rank_adam(spec)`); the aliases (`fo.fira(lr, rank=...)`)
build one from their keywords.

The default rule (`projected=None`) projects a leaf when

1. no component of its key path names an embedding, an output head, a norm, a bias or a norm
   scale (:data:`EXCLUDED`);
2. it has a matrix view (:func:`default_view`): ≥ 2 axes after its stack axes;
3. it is floating-point (integer and bool leaves never are; selecting one explicitly raises);
4. its low-rank state (basis, two moments, the limiter's scalar) is smaller than AdamW's two
   full moments — so a leaf is never projected at a loss.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from fira_optax._checks import as_int
from fira_optax._shapes import (
    DimensionNumbers,
    LeafPlan,
    MatrixView,
    as_dimension_numbers,
    check_proj_type,
    low_rank_state_size,
    side_for,
)
from fira_optax._types import ProjType

#: A pytree of bools (dicts, lists, tuples, ... of Python / NumPy / JAX bools).
BoolTree = bool | np.bool_ | jax.Array | Mapping[Any, "BoolTree"] | Sequence["BoolTree"]

#: Which leaves are projected: None (the default rule), a regex on the '/'-joined key path, a
#: pytree of bools like params, or a callable `params -> pytree of bools`.
ProjectedSpec = str | BoolTree | Callable[[optax.Params], BoolTree] | None

#: A pytree of per-leaf matrix views (None: the leaf's default view).
DimensionNumbersTree = (
    DimensionNumbers
    | Mapping[Any, "DimensionNumbersTree"]
    | Sequence["DimensionNumbersTree"]
    | None
)

#: How leaves are read as matrices: None (the default views), one `DimensionNumbers` for every
#: ≥2-D leaf, a `{regex: DimensionNumbers}` dict, a pytree like params of `DimensionNumbers` /
#: None, or a callable `params -> that pytree`.
DimensionNumbersSpec = (
    DimensionNumbers
    | Mapping[str, DimensionNumbers]
    | DimensionNumbersTree
    | Callable[[optax.Params], DimensionNumbersTree]
    | None
)

#: Key-path components (lower-cased) that the default rule never projects.
EXCLUDED = re.compile(
    r"^(.*embed.*|wte|wpe|lm_head|head|output_head|classifier|logits|unembed.*|.*norm.*|ln_.*"
    r"|.*bias|scale)$"
)

#: Key-path components (lower-cased) that name a stack of layers or experts: each one, when
#: the next component is not an integer index (a Python list of layers), contributes one
#: leading stack axis to the leaves below it (`nnx.scan`/`nnx.vmap`-ed or `nn.scan`-ned
#: layers, stacked experts).
STACKED = re.compile(
    r"^(layers|blocks|stack(ed)?|.*scan(ned)?.*|repeat(ed)?|experts?|.*_experts?)$"
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


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def _dtype(leaf: Any) -> Any:
    return leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)


def has_float_dtype(leaf: Any) -> bool:
    """Whether the leaf holds real or complex floating-point values (not integers, bools,
    `float0` gradients or PRNG keys): only those have a gradient step to project."""
    return jax.dtypes.issubdtype(_dtype(leaf), np.inexact)


def _most_square_split(shape: tuple[int, ...]) -> int:
    """The split `s` of `shape` into rows `shape[:s]` and columns `shape[s:]` closest to square."""
    best, best_score = 1, math.inf
    for s in range(1, len(shape)):
        rows, cols = math.prod(shape[:s]), math.prod(shape[s:])
        score = abs(math.log(max(rows, 1)) - math.log(max(cols, 1)))
        if score < best_score:
            best, best_score = s, score
    return best


def default_view(path: str, shape: tuple[int, ...]) -> MatrixView | None:
    """The default matrix view of a leaf, or None when it is not a matrix (< 2 axes).

    - One leading stack axis per key-path component that names a stack (:data:`STACKED`:
      `layers`, `blocks`, `experts`, `*scan*`, ...) and is not followed by an integer index.
    - Two axes left: one matrix (rows, columns), e.g. `(L, m, n)` under `layers/`.
    - More axes left on a leaf named `kernel` (Flax: Linen `DenseGeneral`, `nnx.LinearGeneral`,
      `MultiHeadAttention`, conv kernels; input axes first, then output axes): one matrix,
      split where rows and columns are closest to square — `(d, heads, head_dim)` →
      `d × heads·head_dim`, `(heads, head_dim, d)` → `heads·head_dim × d`, conv
      `(H, W, I, O)` → `H·W·I × O`.
    - More axes left on any other leaf: a stack over its leading axes (`(E, m, n)` experts).
    """
    if len(shape) < 2:
        return None
    parts = [p.lower() for p in path.split("/")] if path else []
    stacks = sum(
        1 for i, part in enumerate(parts[:-1]) if STACKED.match(part) and not parts[i + 1].isdigit()
    )
    nb = min(stacks, len(shape) - 2)
    rest = shape[nb:]
    if len(rest) > 2 and parts and parts[-1] == "kernel":
        s = nb + _most_square_split(rest)
        rows, cols = tuple(range(nb, s)), tuple(range(s, len(shape)))
    else:
        nb = len(shape) - 2
        rows, cols = (nb,), (nb + 1,)
    return MatrixView(tuple(shape), tuple(range(nb)), rows, cols)


def check_rank(rank: Any) -> int:
    """A positive Python int from an int-like rank (NumPy / JAX integer scalars included)."""
    return as_int("rank", rank)


def _resolve_projected(params: Any, projected: ProjectedSpec) -> Any | None:
    """`projected` as a pytree of bools like params (None for the default rule)."""
    if projected is None:
        return None
    if isinstance(projected, str):
        pattern = re.compile(projected)
        return jax.tree.map_with_path(lambda p, _: bool(pattern.search(path_str(p))), params)
    mask = projected(params) if callable(projected) else projected
    params_def, mask_def = jax.tree.structure(params), jax.tree.structure(mask)
    if params_def != mask_def:
        hint = ""
        if mask_def.num_leaves == 1 and mask_def.num_nodes == 1:  # one value, not a tree
            hint = (
                "\n  (Under optax.inject_hyperparams a function passed as projected is called "
                "as a schedule, with the step count: list 'projected' in static_args.)"
            )
        raise ValueError(
            "projected: the mask tree does not match the params tree.\n"
            f"  params: {params_def}\n  mask:   {mask_def}{hint}"
        )
    return mask


def _resolve_dimension_numbers(params: Any, dims: DimensionNumbersSpec) -> list | None:
    """Per-leaf overrides (a flat list in params' leaf order, None = default view).

    A pytree like params (or a callable returning one) is tried first; a dict that is not
    shaped like params is read as `{regex: DimensionNumbers}` (first match on the key path).
    """
    if dims is None:
        return None
    leaves = jax.tree.leaves_with_path(params)
    try:
        single = as_dimension_numbers(dims)
    except TypeError:
        single = None
    if single is not None:
        return [single if len(_shape(x)) >= 2 else None for _, x in leaves]
    tree = dims(params) if callable(dims) else dims
    try:
        flat = jax.tree.structure(params).flatten_up_to(tree)
    except (ValueError, TypeError):
        flat = None
    if flat is not None:
        return [None if d is None else as_dimension_numbers(d) for d in flat]
    if isinstance(tree, Mapping) and all(isinstance(k, str) for k in tree):
        patterns = [(re.compile(k), as_dimension_numbers(v)) for k, v in tree.items()]

        def lookup(path):
            name = path_str(path)
            return next((d for pattern, d in patterns if pattern.search(name)), None)

        return [lookup(path) for path, _ in leaves]
    raise ValueError(
        "dimension_numbers: expected a DimensionNumbers, a {regex: DimensionNumbers} dict, or "
        "a pytree like params of DimensionNumbers / None (or a callable returning one)."
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectionSpec:
    """Which leaves are projected, how each is read as matrices, at which rank and side.

    Pass one spec to every stateful block of a chain (`project`, `scale_by_low_rank_adam` /
    `in_subspace`, `limit_norm_growth`): they allocate their state from it, so they cannot
    disagree. The aliases (`fira`, `galore`, ...) build one from their arguments.

    Attributes:
      rank: r; each matrix uses `k = min(r, m, n)`. Any integer (NumPy/JAX integer scalars
        too). None only for what needs no low-rank shapes (`limit_norm_growth`,
        `projected_mask`); then the default rule's size check is skipped.
      proj_type: "std" (right if m ≥ n else left), "reverse_std", "left" or "right".
      projected: which leaves: None (the default rule, see the module docstring), a pytree of
        bools like params, a callable `params -> pytree of bools`, or a regex matched
        (`re.search`) against the '/'-joined key path. An explicit choice is honoured as
        given (no size check; selecting an integer or bool leaf raises); zero-size leaves are
        never projected.
      dimension_numbers: how a leaf is read as matrices: None (:func:`default_view`), one
        :class:`DimensionNumbers` for every ≥2-D leaf, a dict `{regex: DimensionNumbers}`
        (first match on the key path; other leaves keep the default), or a pytree like params
        of `DimensionNumbers` / None (None: the default), or a callable returning one.
    """

    rank: int | None
    proj_type: ProjType = "std"
    projected: ProjectedSpec = None
    dimension_numbers: DimensionNumbersSpec = None

    def __post_init__(self):
        if self.rank is not None:
            object.__setattr__(self, "rank", check_rank(self.rank))
        check_proj_type(self.proj_type)

    def plans(self, params: Any) -> Any:
        """A pytree like `params`: a :class:`LeafPlan` per projected leaf, None elsewhere."""
        leaves, treedef = jax.tree.flatten(params)
        del leaves
        return treedef.unflatten(self.flat_plans(params))

    def flat_plans(self, params: Any) -> list[LeafPlan | None]:
        """The plans as a list aligned with `jax.tree.leaves(params)`.

        Raises:
          ValueError: when an explicit `projected` selects a leaf without a matrix view or
            without a floating-point dtype, or a mask / dimension-numbers tree does not match
            params (the leaf is named).
        """
        mask = _resolve_projected(params, self.projected)
        mask_leaves = None if mask is None else jax.tree.leaves(mask)
        overrides = _resolve_dimension_numbers(params, self.dimension_numbers)
        leaves = jax.tree.leaves_with_path(params)
        plans = []
        for i, (path, leaf) in enumerate(leaves):
            name, shape = path_str(path), _shape(leaf)
            override = None if overrides is None else overrides[i]
            view = default_view(name, shape) if override is None else override.view(shape)
            if mask_leaves is None:
                chosen = self._default_choice(name, view) and has_float_dtype(leaf)
            else:
                chosen = bool(mask_leaves[i])
                if chosen and view is None:
                    raise ValueError(
                        f"projected: leaf {name!r} has shape {shape}; only leaves with at least "
                        "two axes (a matrix, or a stack of matrices) can be projected."
                    )
                if chosen and not has_float_dtype(leaf):
                    raise ValueError(
                        f"projected: leaf {name!r} has dtype {_dtype(leaf)}; only floating-point "
                        "leaves can be projected: leave it out of `projected` (set it to False)."
                    )
            if not chosen or math.prod(shape) == 0:
                plans.append(None)
                continue
            side = side_for(view.m, view.n, self.proj_type)
            k = None if self.rank is None else min(self.rank, view.m, view.n)
            plans.append(LeafPlan(name, view, side, k))
        return plans

    def _default_choice(self, name: str, view: MatrixView | None) -> bool:
        if view is None or any(EXCLUDED.match(c) for c in name.lower().split("/")):
            return False
        if self.rank is None:
            return True
        return low_rank_state_size(view, self.rank, self.proj_type) < 2 * math.prod(view.shape)

    def mask(self, params: Any) -> Any:
        """A pytree of Python bools like `params`: True for the projected leaves."""
        treedef = jax.tree.structure(params)
        return treedef.unflatten([plan is not None for plan in self.flat_plans(params)])


def check_spec(
    block: str, spec: Any, *, need_rank: bool = True, allow_none: bool = False
) -> ProjectionSpec | None:
    """`spec` when it is a :class:`ProjectionSpec` (with a rank when `need_rank`), else a
    `TypeError` / `ValueError` that names `fo.ProjectionSpec(...)`."""
    if spec is None and allow_none:
        return None
    if isinstance(spec, ProjectionSpec):
        if need_rank and spec.rank is None:
            raise ValueError(f"{block}: the spec needs a rank: fo.ProjectionSpec(rank=...).")
        return spec
    try:  # a rank where the spec goes (Python, NumPy or JAX integer)
        rank = None if isinstance(spec, (bool, np.bool_)) else operator.index(spec)
    except TypeError:
        rank = None
    same = "" if block == "project" else ", the spec given to fo.project()"
    if spec is None:
        fix = f"pass spec=fo.ProjectionSpec(rank=...){same}"
    elif rank is not None:
        fix = f"pass fo.ProjectionSpec(rank={rank}) (with proj_type=, projected=, "
        fix += f"dimension_numbers= as needed{same})"
    elif isinstance(spec, (float, np.floating)):
        fix = (
            f"pass the spec first and the hyper-parameters after it or by name: "
            f"{block}(fo.ProjectionSpec(rank=...), ...)"
        )
    else:
        fix = "pass fo.ProjectionSpec(rank=...) (with proj_type=, projected=, "
        fix += f"dimension_numbers= as needed{same})"
    raise TypeError(
        f"{block}: the projection is given as a fira_optax.ProjectionSpec, its first argument; "
        f"got {type(spec).__name__} {spec!r}: {fix}."
    )
