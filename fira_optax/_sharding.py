"""Shardings of the optimizer state, derived from the params' shardings.

The state of :func:`fira_optax.fira` / :func:`fira_optax.galore` (and of any chain of the
building blocks, of plain optax transforms, and of the optax wrappers around them:
`MultiSteps`, `inject_hyperparams`, `apply_if_finite`, `chain`, `multi_transform`, `masked`)
holds, per param leaf `W` read as matrices `(*batch, m, n)` (its matrix view, see
:class:`fira_optax.DimensionNumbers`; for a plain matrix `W` itself) with sharding
`PartitionSpec(*s_batch, s_m, s_n)`:

| state leaf                          | shape          | sharding                    |
| basis, left side (`P = U[:, :k]`)   | `(..., m, k)`  | `(*s_batch, s_m, None)`     |
| basis, right side (`P = Vh[:k]`)    | `(..., k, n)`  | `(*s_batch, None, s_n)`     |
| low-rank moments, left side         | `(..., k, n)`  | `(*s_batch, None, s_n)`     |
| low-rank moments, right side        | `(..., m, k)`  | `(*s_batch, s_m, None)`     |
| full moments (not projected leaves) | like `W`       | the param's                 |
| per-matrix scalars (limiter, steps) | `(...)`        | `(*s_batch)`                |
| counts and other scalars            | `()`           | replicated                  |

i.e. every state leaf is sharded along the axes it shares with its param, and replicated along
the rank axis `k`. When `m` (or `n`) merges several param axes (a multi-head kernel
`(d, heads, head_dim)` read as `d × heads·head_dim`), it takes the mesh axes of the sharded
ones, major first. The rule is read off the *shapes*, not off a hard-coded chain layout: the
state is walked and every sub-tree that has the params' tree structure (`bases`, `mu`, `nu`,
`norms`, but also `optax.adam`'s `mu`/`nu`, `MultiSteps`' accumulated gradients, ...) is
matched leaf by leaf to the params; a state leaf is matched against the param's default matrix
view first, then against every other way of reading the param as matrices.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fira_optax._shapes import MatrixView
from fira_optax._spec import default_view, path_str

__all__ = ["optimizer_state_shardings", "state_partition_spec"]


def _has_shape(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _padded(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the array's {ndim} axes.")
    return entries + (None,) * (ndim - len(entries))


def _merged(entries: list[Any]) -> Any:
    """The spec entry of an axis merged (row-major) from axes with these entries."""
    axes: list[str] = []
    for entry in entries:
        if entry is None:
            continue
        axes.extend(entry if isinstance(entry, tuple) else (entry,))
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _candidate_views(shape: tuple[int, ...], first: MatrixView | None) -> list[MatrixView]:
    """`first`, then every view with leading stack axes and a contiguous row/column split."""
    views = [first] if first is not None else []
    ndim = len(shape)
    for nb in range(ndim - 1):
        for split in range(nb + 1, ndim):
            views.append(
                MatrixView(
                    shape,
                    tuple(range(nb)),
                    tuple(range(nb, split)),
                    tuple(range(split, ndim)),
                )
            )
    return views


def state_partition_spec(
    state_shape: tuple[int, ...],
    param_shape: tuple[int, ...],
    param_spec: PartitionSpec,
    view: MatrixView | None = None,
) -> PartitionSpec:
    """The `PartitionSpec` of one state leaf matched to the param leaf it belongs to.

    Args:
      state_shape: shape of the state leaf.
      param_shape: shape of its param.
      param_spec: the param's `PartitionSpec`.
      view: the param's matrix view, tried first (default: the plain `(..., m, n)` reading
        and every other view of the param's axes).

    Returns:
      The param's spec for a leaf of the param's shape; for `(*batch, m, k)` the batch and `m`
      entries (`k` replicated); for `(*batch, k, n)` the batch and `n` entries; for the batch
      shape `(...)` the batch entries; replicated for anything else (scalars included).
    """
    state_shape, param_shape = tuple(state_shape), tuple(param_shape)
    spec = _padded(param_spec, len(param_shape))
    if state_shape == param_shape:
        return PartitionSpec(*spec)
    for v in _candidate_views(param_shape, view):
        batch = [spec[a] for a in v.batch_axes]
        nb = len(batch)
        if state_shape == v.batch_shape:
            return PartitionSpec(*batch)
        if len(state_shape) != nb + 2 or state_shape[:nb] != v.batch_shape:
            continue
        k_max = min(v.m, v.n)
        if state_shape[-2] == v.m and state_shape[-1] <= k_max:  # (..., m, k)
            return PartitionSpec(*batch, _merged([spec[a] for a in v.row_axes]), None)
        if state_shape[-1] == v.n and state_shape[-2] <= k_max:  # (..., k, n)
            return PartitionSpec(*batch, None, _merged([spec[a] for a in v.col_axes]))
    return PartitionSpec()


def _param_specs(params: Any, param_shardings: Any, mesh: Mesh | None) -> tuple[list, Mesh]:
    """Flat list of the params' `PartitionSpec`s and the (single) mesh."""
    params_def = jax.tree.structure(params)
    if param_shardings is None:
        flat = [getattr(p, "sharding", None) for p in params_def.flatten_up_to(params)]
    else:
        flat = params_def.flatten_up_to(param_shardings)
    specs, meshes = [], []
    for s in flat:
        if isinstance(s, NamedSharding):
            specs.append(s.spec)
            meshes.append(s.mesh)
        elif isinstance(s, PartitionSpec):
            specs.append(s)
        elif s is None:
            specs.append(PartitionSpec())
        else:
            raise TypeError(
                "optimizer_state_shardings: every param sharding must be a NamedSharding, a "
                f"PartitionSpec (with `mesh=`) or None (replicated); got {s!r}."
            )
    if mesh is None:
        if not meshes:
            raise ValueError(
                "optimizer_state_shardings: pass `mesh=` when the param shardings are "
                "PartitionSpecs."
            )
        mesh = meshes[0]
    for other in meshes:
        if other != mesh:
            raise ValueError("optimizer_state_shardings: the params live on different meshes.")
    return specs, mesh


def optimizer_state_shardings(
    tx_or_state: optax.GradientTransformation | Any,
    params: Any,
    param_shardings: Any = None,
    *,
    mesh: Mesh | None = None,
) -> Any:
    """`NamedSharding`s for an optimizer state, derived from the params' shardings.

    Usable as `jax.jit(tx.init, out_shardings=...)` and as the state's in/out shardings of the
    train step. The state is sharded along the axes it shares with its param and replicated
    along the rank axis (see the module docstring for the table): nothing of size m×n is
    replicated, and a tensor-/FSDP-sharded param gets a sharded basis and sharded moments.

    Works for :func:`fira_optax.fira`, :func:`fira_optax.galore`, chains of the building blocks,
    plain optax transforms (their per-param moments are sharded like the params) and the optax
    wrappers around them (`optax.MultiSteps`, `inject_hyperparams`, `apply_if_finite`,
    `chain`, `multi_transform`, `masked`); a state that holds something other than arrays
    raises a `TypeError` naming the state type that holds it.

    Args:
      tx_or_state: an `optax.GradientTransformation` or an object with `init`/`update` such
        as `optax.MultiSteps` (its `init` is traced with `jax.eval_shape`), or a state
        (arrays or `jax.ShapeDtypeStruct`s) already built.
      params: the params, or their `jax.ShapeDtypeStruct`s.
      param_shardings: a tree like `params` of `NamedSharding`s, or of `PartitionSpec`s
        (then `mesh` is needed), None leaves meaning replicated. Default: the params' own
        `.sharding` (concrete arrays, or `ShapeDtypeStruct`s built with `sharding=`).
      mesh: the mesh, when `param_shardings` holds `PartitionSpec`s.

    Returns:
      A tree with the structure of the state: a `NamedSharding` for every array leaf (None and
      other empty nodes are kept as they are).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, fira_optax as fo
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> params = {"w": jnp.zeros((8, 16)), "b": jnp.zeros(16)}
      >>> shardings = {"w": NamedSharding(mesh, P(None, "model")), "b": NamedSharding(mesh, P())}
      >>> tx = fo.fira(1e-3, rank=4)
      >>> state_sh = fo.optimizer_state_shardings(tx, params, shardings)
      >>> state = jax.jit(tx.init, out_shardings=state_sh)(params)
      >>> state[0][0].bases["w"].sharding.spec  # left basis (8, 4): replicated along k
      P(None, None)
      >>> state[0][1].mu["w"].sharding.spec  # low-rank moment (4, 16): sharded along n
      P(None, 'model')
    """
    if callable(getattr(tx_or_state, "init", None)) and callable(
        getattr(tx_or_state, "update", None)
    ):  # a GradientTransformation, or an optax wrapper object such as optax.MultiSteps
        state = jax.eval_shape(tx_or_state.init, params)
    else:
        state = tx_or_state
    params_def = jax.tree.structure(params)
    flat_params = jax.tree.leaves_with_path(params)
    param_shapes = [tuple(p.shape) for _, p in flat_params]
    views = [default_view(path_str(path), tuple(p.shape)) for path, p in flat_params]
    specs, mesh = _param_specs(params, param_shardings, mesh)
    params_is_leaf = params_def.num_nodes == 1

    def named(spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(mesh, spec)

    def match(node: Any) -> list | None:
        """The node's sub-trees at the params' leaf positions, if it has params' structure."""
        if params_is_leaf or node is None or _has_shape(node):
            return None
        try:
            return params_def.flatten_up_to(node)
        except (ValueError, TypeError):
            return None

    def leaf_spec(x: Any, i: int) -> NamedSharding:
        return named(state_partition_spec(x.shape, param_shapes[i], specs[i], views[i]))

    def walk(node: Any, owner: str) -> Any:
        if _has_shape(node):  # a leaf outside any params-like sub-tree: counts, scalars
            return leaf_spec(node, 0) if params_is_leaf else named(PartitionSpec())
        if isinstance(node, (bool, int, float, complex)):  # a Python scalar leaf
            return named(PartitionSpec())
        matched = match(node)
        if matched is not None:
            out = [
                jax.tree.map(lambda x, i=i: leaf_spec(x, i), sub) for i, sub in enumerate(matched)
            ]
            return params_def.unflatten(out)
        children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
        if treedef.num_leaves == 1 and treedef.num_nodes == 1:  # not an array, not a pytree
            raise TypeError(
                f"optimizer_state_shardings: the state of {owner} holds a "
                f"{type(node).__name__} ({node!r:.80}), which is neither an array nor a "
                "pytree of arrays; pass the state's shardings for this wrapper yourself."
            )
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            owner = type(node).__name__
        return treedef.unflatten([walk(c, owner) for c in children])

    return walk(state, type(state).__name__)
