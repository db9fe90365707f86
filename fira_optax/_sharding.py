"""Shardings of the optimizer state, derived from the params' shardings.

The state of :func:`fira_optax.fira` / :func:`fira_optax.galore` (and of any chain of the
building blocks, or of plain optax transforms) holds, per param leaf `W` of shape
`(..., m, n)` with sharding `PartitionSpec(*batch, s_m, s_n)`:

| state leaf                          | shape          | sharding                    |
| basis, left side (`P = U[:, :k]`)   | `(..., m, k)`  | `(*batch, s_m, None)`       |
| basis, right side (`P = Vh[:k]`)    | `(..., k, n)`  | `(*batch, None, s_n)`       |
| low-rank moments, left side         | `(..., k, n)`  | `(*batch, None, s_n)`       |
| low-rank moments, right side        | `(..., m, k)`  | `(*batch, s_m, None)`       |
| full moments (not projected leaves) | `(..., m, n)`  | the param's                 |
| limiter memory `g`                  | `(...)`        | `(*batch)`                  |
| counts and other scalars            | `()`           | replicated                  |

i.e. every state leaf is sharded along the axes it shares with its param, and replicated along
the rank axis `k`. The rule is read off the *shapes*, not off a hard-coded chain layout: the
state is walked and every sub-tree that has the params' tree structure (`bases`, `mu`, `nu`,
`norms`, but also `optax.adam`'s `mu`/`nu`, ...) is matched leaf by leaf to the params.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["optimizer_state_shardings", "state_partition_spec"]


def _is_sharding_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, jax.sharding.Sharding))


def _has_shape(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _padded(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the array's {ndim} axes.")
    return entries + (None,) * (ndim - len(entries))


def state_partition_spec(
    state_shape: tuple[int, ...], param_shape: tuple[int, ...], param_spec: PartitionSpec
) -> PartitionSpec:
    """The `PartitionSpec` of one state leaf matched to the param leaf it belongs to.

    Args:
      state_shape: shape of the state leaf.
      param_shape: shape of its param, `(..., m, n)` for a matrix or a stack of matrices.
      param_spec: the param's `PartitionSpec`.

    Returns:
      The param's spec for a leaf of the param's shape; for `(..., m, k)` the batch and `m`
      entries (`k` replicated); for `(..., k, n)` the batch and `n` entries; for the batch
      shape `(...)` the batch entries; replicated for anything else (scalars included).
    """
    state_shape, param_shape = tuple(state_shape), tuple(param_shape)
    spec = _padded(param_spec, len(param_shape))
    if state_shape == param_shape:
        return PartitionSpec(*spec)
    if len(param_shape) >= 2:
        nb = len(param_shape) - 2
        batch, s_m, s_n = spec[:nb], spec[-2], spec[-1]
        m, n = param_shape[-2:]
        if len(state_shape) == len(param_shape) and state_shape[:nb] == param_shape[:nb]:
            if state_shape[-2] == m:  # (..., m, k): left basis / right low-rank moments
                return PartitionSpec(*batch, s_m, None)
            if state_shape[-1] == n:  # (..., k, n): right basis / left low-rank moments
                return PartitionSpec(*batch, None, s_n)
        if state_shape == param_shape[:nb]:  # per-matrix scalars (limiter memory)
            return PartitionSpec(*batch)
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

    Works for :func:`fira_optax.fira`, :func:`fira_optax.galore`, chains of the building blocks
    and plain optax transforms (their per-param moments are sharded like the params).

    Args:
      tx_or_state: an `optax.GradientTransformation` (its `init` is traced with
        `jax.eval_shape`), or a state (arrays or `jax.ShapeDtypeStruct`s) already built.
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
    if isinstance(tx_or_state, optax.GradientTransformation):
        state = jax.eval_shape(tx_or_state.init, params)
    else:
        state = tx_or_state
    params_def = jax.tree.structure(params)
    param_shapes = [tuple(p.shape) for p in params_def.flatten_up_to(params)]
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

    def walk(node: Any) -> Any:
        if _has_shape(node):  # a leaf outside any params-like sub-tree: counts, scalars
            if params_is_leaf:
                return named(state_partition_spec(node.shape, param_shapes[0], specs[0]))
            return named(PartitionSpec())
        matched = match(node)
        if matched is not None:
            out = []
            for sub, shape, spec in zip(matched, param_shapes, specs, strict=True):
                out.append(
                    jax.tree.map(
                        lambda x, shape=shape, spec=spec: named(
                            state_partition_spec(x.shape, shape, spec)
                        ),
                        sub,
                    )
                )
            return params_def.unflatten(out)
        children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
        if treedef.num_leaves == 1 and treedef.num_nodes == 1:  # an opaque leaf (not an array)
            return node
        return treedef.unflatten([walk(c) for c in children])

    return walk(state)
