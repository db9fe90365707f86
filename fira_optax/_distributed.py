"""The divided refresh: on a mesh, each device decomposes its share of the projected matrices.

Imports `_shapes`, `_spec` (key paths) and `_refresh` (downward only).

:class:`DividedRefresh` is the mesh implementation of `_refresh.Refresher`; :func:`refresher`
picks it or `_refresh.LocalRefresh` when `project` is constructed. Without the params'
layouts, every projected leaf is refreshed where it is (`LocalRefresh`): under SPMD the
partitioner all-gathers each projected gradient and every device computes every SVD. Given
the layouts (`refresh_shardings=`), the refresh step is one `shard_map` over the whole mesh
whose inputs and outputs keep the param / state layouts (so the rest of the step is
untouched), with explicit communication inside:

1. every projected matrix is read in *left form* — `G` (m×n) for a left basis, `Gᵀ` for a
   right one, so that the basis spans its columns — and the matrices of equal left-form shape,
   rank, dtype and layout form a group (across leaves and layers: e.g. the q/k/v kernels of
   every layer);
2. each device holds a block of each matrix (its FSDP / tensor-parallel shard). Devices that
   hold the same block (a mesh axis the matrix is not sharded over) each keep a distinct slice
   of it, so every element is sent once;
3. the matrices of a group are placed on the devices (the *owners*), largest refresh cost
   first, each on the least-loaded owner (longest-processing-time first), and one
   `all_to_all` over the mesh axes sends every block to the owner of its matrix — each device
   sends and receives about its own share of the gradients; nothing of size m×n is
   all-gathered;
4. every owner refreshes its matrices one at a time with exactly the single-device code
   (the strategy's function on the left form, the same per-matrix key from
   `_refresh.matrix_keys`, the same sign rule, the same `_refresh.refresh_if_due`; the
   randomized warm start travels like the gradient), skipping empty and not-due slots;
5. a second `all_to_all` returns to every device the rows of each new basis its state holds
   (the basis is sharded like the gradient along the dimension it keeps), with a per-matrix
   "refreshed" flag (all-gathered, one bool per matrix); a matrix that was not refreshed (not
   due, idle, a non-finite result) keeps its basis, as on one device.

A leaf sharded along its stack axis (layers or experts over a mesh axis) is refreshed by the
devices of its own stack shard. Layouts this cannot read as blocks (a merged dimension whose
minor axis is sharded, an axis not divisible by its mesh axes) are gathered along those axes
when the refresh starts (correct, not divided along them).

The module has two halves: the *static* placement (:func:`layout`, :func:`plan_groups`:
Python on shapes, key paths and `PartitionSpec`s, run once per trace) and the *traced*
refresh (:meth:`DividedRefresh.__call__` and the `shard_map` body). Data-free strategies
("random", "random_orthonormal") and callables are not divided: the random ones read no
gradient (no gradient moves; under jit each device draws what its sharded state holds) and a
callable runs where the gradient is.

The randomized refresh is divided the same way (whole matrices per owner) rather than by
sketching the sharded gradient and all-reducing the sketches: subspace iteration needs about
five sketches per matrix, each as large as the basis (`AΩ`, and `AᵀQ`, `AAᵀQ` per power
iteration, `QᵀA`), and its thin QRs and Rayleigh–Ritz step would still run replicated on every
device — more bytes and less division than sending every gradient block once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fira_optax._refresh import (
    STRATEGIES,
    LocalRefresh,
    Refresh,
    Refresher,
    RefreshLeaf,
    refresh_cost,
    refresh_if_due,
)
from fira_optax._shapes import LEFT, LeafPlan, MatrixView
from fira_optax._spec import path_str
from fira_optax._types import RefreshMethod

try:  # jax ≥ 0.7
    from jax import shard_map as _shard_map

    def _smap(fn, mesh, in_specs, out_specs):
        return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map

    def _smap(fn, mesh, in_specs, out_specs):
        return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ----------------------------------------------------------------------------------------------
# Layouts (static).


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one projected leaf lies on the mesh, read in left form (static, hashable).

    Attributes:
      grad_spec: the `PartitionSpec` the gradient enters the refresh with (the param's, with
        the axes the refresh cannot read as blocks removed).
      basis_spec: the state basis' `PartitionSpec` (batch entries, the kept dimension's axes,
        `k` replicated).
      batch: mesh axes that shard the stack, in mesh order.
      rows: mesh axes that shard the left form's rows `m'` (the basis' kept dimension),
        major first.
      cols: mesh axes that shard its columns `n'`, major first.
    """

    grad_spec: PartitionSpec
    basis_spec: PartitionSpec
    batch: tuple[str, ...]
    rows: tuple[str, ...]
    cols: tuple[str, ...]


def layout(plan: LeafPlan, spec: PartitionSpec, mesh_shape: dict[str, int]) -> Layout:
    """The :class:`Layout` of a projected leaf whose param has `spec`."""
    view = plan.view
    entries = list(tuple(spec)) + [None] * (len(view.shape) - len(tuple(spec)))
    entries = entries[: len(view.shape)]

    def size(axes):
        return math.prod(mesh_shape[a] for a in axes)

    for axis, entry in enumerate(entries):  # an axis not divisible by its mesh axes: whole
        if view.shape[axis] % size(_entry_axes(entry)):
            entries[axis] = None

    def merged(axes: tuple[int, ...]) -> tuple[str, ...]:
        """Mesh axes of a merged dimension: a device's block of it is a contiguous range only
        when its one sharded param axis comes first (after size-1 axes); others are whole."""
        out: tuple[str, ...] = ()
        for pos, axis in enumerate(axes):
            if not _entry_axes(entries[axis]):
                continue
            if out or any(view.shape[b] > 1 for b in axes[:pos]):
                entries[axis] = None
            else:
                out = _entry_axes(entries[axis])
        return out

    rows_m, cols_n = merged(view.row_axes), merged(view.col_axes)
    batch_axes = tuple(a for axis in view.batch_axes for a in _entry_axes(entries[axis]))
    names = list(mesh_shape)
    batch = tuple(sorted(batch_axes, key=names.index))
    rows, cols = (rows_m, cols_n) if plan.side == LEFT else (cols_n, rows_m)
    batch_entries = [entries[axis] for axis in view.batch_axes]
    kept = rows if rows else None
    kept = kept[0] if kept is not None and len(kept) == 1 else kept
    if plan.side == LEFT:
        basis_spec = PartitionSpec(*batch_entries, kept, None)
    else:
        basis_spec = PartitionSpec(*batch_entries, None, kept)
    return Layout(PartitionSpec(*entries), basis_spec, batch, rows, cols)


# ----------------------------------------------------------------------------------------------
# Placement (static): which device refreshes which matrix.


@dataclasses.dataclass(frozen=True)
class PlacedLeaf:
    """The static facts of one projected leaf that its placement reads.

    Attributes:
      plan: the leaf's plan (matrix view, side, k, key path).
      layout: its :class:`Layout`.
      dtype: its gradient's dtype name.
    """

    plan: LeafPlan
    layout: Layout
    dtype: str


class GroupKey(NamedTuple):
    """What the matrices of a group share: left-form shape `m×n`, rank, dtype, layout."""

    m: int
    n: int
    k: int
    dtype: str
    layout: Layout


def _left_shape(plan: LeafPlan) -> tuple[int, int]:
    m, n = plan.view.m, plan.view.n
    return (m, n) if plan.side == LEFT else (n, m)


def _batch_blocks(plan: LeafPlan, spec: PartitionSpec, mesh_shape: dict[str, int]):
    """Per batch-group coordinate (linear over the layout's batch axes, mesh order), the
    flat global stack indices a device of that group holds, in its local order."""
    view = plan.view
    entries = list(tuple(spec)) + [None] * (len(view.shape) - len(tuple(spec)))
    names = list(mesh_shape)
    batch_axes = sorted(
        {a for axis in view.batch_axes for a in _entry_axes(entries[axis])}, key=names.index
    )
    sizes = [mesh_shape[a] for a in batch_axes]
    groups = []
    for coord in np.ndindex(*sizes):
        where = dict(zip(batch_axes, coord, strict=True))
        ranges = []
        for axis in view.batch_axes:
            axes = _entry_axes(entries[axis])
            block = 0
            for a in axes:
                block = block * mesh_shape[a] + where[a]
            n = view.shape[axis] // math.prod(mesh_shape[a] for a in axes)
            ranges.append(range(block * n, (block + 1) * n))
        flat = []
        for index in np.ndindex(*[len(r) for r in ranges]):
            position = tuple(r[i] for r, i in zip(ranges, index, strict=True))
            flat.append(int(np.ravel_multi_index(position, view.batch_shape)) if position else 0)
        groups.append(flat)
    return groups


@dataclasses.dataclass(frozen=True)
class _Group:
    """Matrices of equal left-form shape, rank, dtype and layout, and where each is refreshed.

    `entries[t] = (leaf, local index)`: the local stack every device of a batch group builds
    (the same structure on every device); `slots`: for each owner (linear index over the
    non-batch mesh axes, mesh order) `c` local-stack positions or None (empty), flattened
    owner-major.
    """

    key: GroupKey
    leaves: tuple[int, ...]
    entries: tuple[tuple[int, int], ...]
    slots: tuple[int | None, ...]
    per_owner: int


def plan_groups(
    leaves: Sequence[PlacedLeaf],
    members: Sequence[Sequence[int]],
    mesh_shape: dict[str, int],
    method: str,
) -> list[_Group]:
    """Groups the matrices and places them on owners, longest processing time first.

    Each matrix goes to the least-loaded owner (summed refresh cost over every group) that
    still has room in its group (at most `⌈entries / owners⌉`, so that few slots are empty).
    """
    by_key: dict[GroupKey, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if members[i]:
            plan = leaf.plan
            key = GroupKey(*_left_shape(plan), plan.k, leaf.dtype, leaf.layout)
            by_key.setdefault(key, []).append(i)
    total = math.prod(mesh_shape.values())
    keys = list(by_key)
    entries: list[list[tuple[int, int]]] = []
    for key in keys:
        group_entries = []
        for i in by_key[key]:
            local = _batch_blocks(leaves[i].plan, key.layout.grad_spec, mesh_shape)[0]
            if key.layout.batch:  # a stack shard: all its matrices (members differ per shard)
                group_entries += [(i, j) for j in range(len(local))]
            else:
                wanted = set(members[i])
                group_entries += [(i, j) for j, flat in enumerate(local) if flat in wanted]
        entries.append(group_entries)
    owners = [total // math.prod(mesh_shape[a] for a in key.layout.batch) for key in keys]
    caps = [-(-len(e) // o) for e, o in zip(entries, owners, strict=True)]
    assigned = [[[] for _ in range(o)] for o in owners]
    loads: dict[int, list[int]] = {o: [0] * o for o in owners}
    items = sorted(
        (-refresh_cost(key.m, key.n, key.k, method), g, t)
        for g, key in enumerate(keys)
        for t in range(len(entries[g]))
    )
    for neg_cost, g, t in items:
        load = loads[owners[g]]
        free = [o for o in range(owners[g]) if len(assigned[g][o]) < caps[g]]
        o = min(free, key=lambda o: (load[o], o))
        assigned[g][o].append(t)
        load[o] -= neg_cost
    out = []
    for g, key in enumerate(keys):
        slots: list[int | None] = []
        for owned in assigned[g]:
            slots += sorted(owned) + [None] * (caps[g] - len(owned))
        out.append(_Group(key, tuple(by_key[key]), tuple(entries[g]), tuple(slots), caps[g]))
    return out


# ----------------------------------------------------------------------------------------------
# The refresh (traced): the refresher, and the `shard_map` body.


class _Traced(NamedTuple):
    """The traced inputs of one leaf: gradient (param shape), basis (state shape), key data per
    matrix `(B, …)` (uint32) and `due` per matrix, flat `(B,)`."""

    grad: jax.Array
    basis: jax.Array
    keys: jax.Array
    due: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class DividedRefresh:
    """A `_refresh.Refresher` that divides the refresh over `mesh` (see the module).

    One `lax.switch`: nothing due → the old bases; due matrices in several phases (the
    first step, or after idle steps) → a refresh of every matrix (each owner skips the ones
    not due); exactly one phase of the staggered schedule due → a refresh of that phase's
    matrices only, so only their gradients move (the official schedule has one phase).

    Attributes:
      method: a strategy that reads the gradient ("svd", "randomized").
      mesh: the `jax.sharding.Mesh` of the layouts (more than one device).
      specs: `{key path: PartitionSpec}` of the params.
    """

    method: RefreshMethod
    mesh: Any
    specs: Mapping[str, PartitionSpec]

    def placed(self, leaf: RefreshLeaf) -> PlacedLeaf:
        """The static placement facts of `leaf` (raises when its layout is missing)."""
        path = leaf.plan.path
        if path not in self.specs:
            known = ", ".join(sorted(self.specs)[:6])
            raise ValueError(
                f"project: refresh_shardings has no sharding for the projected leaf {path!r} "
                f"(it has {known}, ...): pass the params' shardings, a tree like params."
            )
        lay = layout(leaf.plan, self.specs[path], dict(self.mesh.shape))
        return PlacedLeaf(leaf.plan, lay, jnp.dtype(leaf.grad.dtype).name)

    def __call__(self, leaves: Sequence[RefreshLeaf]) -> list[jax.Array]:
        if not leaves:
            return []
        placed = [self.placed(leaf) for leaf in leaves]
        traced = [
            _Traced(
                leaf.grad,
                leaf.basis,
                jax.random.key_data(leaf.keys),
                leaf.due.reshape(math.prod(leaf.plan.batch_shape)),
            )
            for leaf in leaves
        ]
        sizes = [math.prod(leaf.plan.batch_shape) for leaf in leaves]
        everything = [list(range(size)) for size in sizes]
        phase_members = []
        if leaves[0].offset is not None:
            flat = [np.ravel(leaf.offset) for leaf in leaves]
            phases = sorted({int(p) for f in flat for p in f})
            if len(phases) > 1:
                phase_members = [[np.flatnonzero(f == p).tolist() for f in flat] for p in phases]

        def due_in(members):
            hits = [
                jnp.any(t.due[np.asarray(m)]) for t, m in zip(traced, members, strict=True) if m
            ]
            return jnp.any(jnp.stack(hits))

        def run(members):
            return _refresh_members(placed, traced, members, self.mesh, self.method)

        old = [leaf.basis for leaf in leaves]
        branches = [lambda: old, lambda: run(everything)]
        branches += [lambda members=members: run(members) for members in phase_members]
        if not phase_members:
            index = due_in(everything).astype(jnp.int32)
        else:
            hit = jnp.stack([due_in(members) for members in phase_members])
            count = jnp.sum(hit.astype(jnp.int32))
            one = 2 + jnp.argmax(hit).astype(jnp.int32)
            index = jnp.where(count == 0, 0, jnp.where(count > 1, 1, one))
        return jax.lax.switch(index, branches)


def refresher(refresh: Refresh, refresh_shardings: Any = None) -> Refresher:
    """The refresher of a `project` transform, picked when it is constructed.

    :class:`DividedRefresh` when the params' shardings are given, their mesh has more than
    one device and the strategy reads the gradient; otherwise `_refresh.LocalRefresh`
    (data-free strategies and callables are never divided: see the module).
    """
    if refresh_shardings is None or callable(refresh):
        return LocalRefresh(refresh)
    if not STRATEGIES[refresh].reads_gradient:
        return LocalRefresh(refresh)
    mesh, specs = mesh_and_specs(refresh_shardings)
    if mesh.size == 1:
        return LocalRefresh(refresh)
    return DividedRefresh(refresh, mesh, specs)


def _refresh_members(
    placed: Sequence[PlacedLeaf],
    traced: Sequence[_Traced],
    members: Sequence[Sequence[int]],
    mesh: Any,
    method: RefreshMethod,
) -> list[jax.Array]:
    """New bases for the leaves, the matrices `members` refreshed divided over `mesh`.

    Args:
      placed: the projected leaves' static facts (plans, layouts).
      traced: their gradients, bases, keys and `due`, in the same order.
      members: per leaf, the flat stack indices of the matrices this refresh may update (the
        others keep their basis): all of them, or one phase of the staggered schedule.
      mesh: the `jax.sharding.Mesh` of the layouts.
      method: "svd" or "randomized".

    Returns:
      The new bases, one per leaf, in the state's layout.
    """
    names = tuple(mesh.axis_names)
    mesh_shape = dict(mesh.shape)
    groups = plan_groups(placed, members, mesh_shape, method)
    impl = jax.random.key_impl(jax.random.key(0))
    used = sorted({i for g in groups for i in g.leaves})

    # Replicated per-slot tables: key data and due, `(batch groups, owners·c, …)`.
    tables = []
    for g in groups:
        lay = g.key.layout
        blocks = {i: _batch_blocks(placed[i].plan, lay.grad_spec, mesh_shape) for i in g.leaves}
        n_batch = math.prod(mesh_shape[a] for a in lay.batch)
        keys_rows, due_rows = [], []
        for beta in range(n_batch):
            keys_row, due_row = [], []
            for t in g.slots:
                if t is None:
                    keys_row.append(jnp.zeros(traced[g.leaves[0]].keys.shape[1:], jnp.uint32))
                    due_row.append(jnp.zeros((), bool))
                    continue
                i, j = g.entries[t]
                flat = blocks[i][beta][j]
                keys_row.append(traced[i].keys[flat])
                wanted = flat in set(members[i])
                due_row.append(traced[i].due[flat] & wanted)
            keys_rows.append(jnp.stack(keys_row))
            due_rows.append(jnp.stack(due_row))
        tables.append((jnp.stack(keys_rows), jnp.stack(due_rows)))

    def local(grads, bases, tables):
        grads = dict(zip(used, grads, strict=True))
        bases = dict(zip(used, bases, strict=True))
        cands: dict[int, list] = {i: [] for i in used}  # (local index, candidate, ok)
        for g, (keys_table, due_table) in zip(groups, tables, strict=True):
            m, n, k, lay = g.key.m, g.key.n, g.key.k, g.key.layout
            batch_names = tuple(a for a in names if a in lay.batch)
            owner_names = tuple(a for a in names if a not in lay.batch)
            owners = math.prod(mesh_shape[a] for a in owner_names)
            beta = jax.lax.axis_index(batch_names) if batch_names else 0
            me = jax.lax.axis_index(owner_names) if owner_names else 0
            c = g.per_owner

            blocks = [_left_local(grads[i], placed[i].plan, lay) for i in g.leaves]
            a = _gather_to_owners(
                blocks,
                g,
                lay.rows,
                lay.cols,
                names,
                mesh_shape,
                owner_names,
                (m, n),
            )
            old = None
            if method == "randomized":
                old = _gather_to_owners(
                    [_basis_left_local(bases[i], placed[i].plan) for i in g.leaves],
                    g,
                    lay.rows,
                    (),
                    names,
                    mesh_shape,
                    owner_names,
                    (m, k),
                )
            start = me * c
            keys = jax.lax.dynamic_slice_in_dim(keys_table[beta], start, c)
            due = jax.lax.dynamic_slice_in_dim(due_table[beta], start, c)
            cand, ok = _compute(a, old, keys, due, k, method, impl)
            rows_back, locate = _return_rows(cand, lay.rows, mesh_shape, owner_names)
            ok_all = (
                jax.lax.all_gather(ok, owner_names, tiled=True)
                if owner_names and owners > 1
                else ok
            )
            for s, t in enumerate(g.slots):
                if t is not None:
                    i, j = g.entries[t]
                    cands[i].append((j, rows_back[locate(s)], ok_all[s]))
        outs = []
        for i in used:
            plan = placed[i].plan
            old_left = _basis_left_local(bases[i], plan)  # (Bl, mb, k)
            size = old_left.shape[0]
            new = old_left
            if cands[i]:
                index = np.full(size, -1)
                pieces, flags = [], []
                for pos, (j, cand, ok) in enumerate(cands[i]):
                    index[j] = pos
                    pieces.append(cand)
                    flags.append(ok)
                stack = jnp.stack(pieces)
                okv = jnp.stack(flags)
                take = np.maximum(index, 0)
                have = jnp.asarray(index >= 0) & okv[take]
                new = jnp.where(have[:, None, None], stack[take], old_left)
            outs.append(_basis_from_left_local(new, bases[i], plan))
        return tuple(outs)

    in_specs = (
        tuple(placed[i].layout.grad_spec for i in used),
        tuple(placed[i].layout.basis_spec for i in used),
        tuple((PartitionSpec(), PartitionSpec()) for _ in groups),
    )
    out_specs = tuple(placed[i].layout.basis_spec for i in used)
    new = _smap(local, mesh, in_specs, out_specs)(
        tuple(traced[i].grad for i in used), tuple(traced[i].basis for i in used), tuple(tables)
    )
    out = [t.basis for t in traced]
    for i, basis in zip(used, new, strict=True):
        out[i] = basis
    return out


def _left_local(grad: jax.Array, plan: LeafPlan, lay: Layout) -> jax.Array:
    """A device's block of a gradient leaf as `(Bl, m'_loc, n'_loc)` (left form)."""
    view = MatrixView(
        tuple(grad.shape), plan.view.batch_axes, plan.view.row_axes, plan.view.col_axes
    )
    x = view.to_matrix(grad)
    x = x.reshape(-1, *x.shape[-2:])
    return x if plan.side == LEFT else jnp.swapaxes(x, -1, -2)


def _basis_left_local(basis: jax.Array, plan: LeafPlan) -> jax.Array:
    """A device's block of a basis as `(Bl, mb, k)` (left form), float32."""
    x = basis.reshape(-1, *basis.shape[-2:]).astype(jnp.float32)
    return x if plan.side == LEFT else jnp.swapaxes(x, -1, -2)


def _basis_from_left_local(x: jax.Array, like: jax.Array, plan: LeafPlan) -> jax.Array:
    if plan.side != LEFT:
        x = jnp.swapaxes(x, -1, -2)
    return x.reshape(like.shape).astype(like.dtype)


def _gather_to_owners(
    blocks: list[jax.Array],
    g: _Group,
    rows: tuple[str, ...],
    cols: tuple[str, ...],
    names: tuple[str, ...],
    mesh_shape: dict[str, int],
    owner_names: tuple[str, ...],
    full: tuple[int, int],
) -> jax.Array:
    """The owner's `c` whole matrices `(c, *full)` from every device's blocks.

    `blocks`: per leaf of the group, the device's `(Bl, mb, nb)` blocks (rows over `rows`,
    columns over `cols`, the other owner axes holding copies). Copies are split: the device
    keeps the slice of its copy given by its index along the copy axes (rows, else columns,
    else the copies are all sent and the first one is used).
    """
    m, n = full
    stack = jnp.stack([blocks[g.leaves.index(i)][j] for i, j in g.entries])
    mb, nb = stack.shape[-2:]
    copies = tuple(a for a in owner_names if a not in rows and a not in cols)
    n_copies = math.prod(mesh_shape[a] for a in copies)
    split = None
    if n_copies > 1:
        q = jax.lax.axis_index(copies)
        if mb % n_copies == 0:
            split = "rows"
            stack = jax.lax.dynamic_slice_in_dim(stack, q * (mb // n_copies), mb // n_copies, 1)
        elif nb % n_copies == 0:
            split = "cols"
            stack = jax.lax.dynamic_slice_in_dim(stack, q * (nb // n_copies), nb // n_copies, 2)
    pm, pn = stack.shape[-2:]
    c = g.per_owner
    owners = math.prod(mesh_shape[a] for a in owner_names)
    pad = jnp.zeros((1, pm, pn), stack.dtype)
    stack = jnp.concatenate([stack, pad], axis=0)
    order = np.array([len(g.entries) if t is None else t for t in g.slots])
    send = stack[order].reshape(owners, c, pm, pn)
    if owners > 1:
        recv = jax.lax.all_to_all(send, owner_names, 0, 0, tiled=False)
    else:
        recv = send
    # recv[d]: device d's piece of my c matrices; d over the owner axes (mesh order).
    sizes = [mesh_shape[a] for a in owner_names]
    recv = recv.reshape(*sizes, c, pm, pn)
    pos = {a: i for i, a in enumerate(owner_names)}
    nd = len(owner_names)
    if split is None and copies:  # copies sent in full (or size-1 axes): keep the first
        index = tuple(0 if a in copies else slice(None) for a in owner_names)
        recv = recv[index]
        kept = [a for a in owner_names if a not in copies]
        pos = {a: i for i, a in enumerate(kept)}
        nd = len(kept)
    row_axes = list(rows) + (list(copies) if split == "rows" else [])
    col_axes = list(cols) + (list(copies) if split == "cols" else [])
    perm = [nd] + [pos[a] for a in row_axes] + [nd + 1] + [pos[a] for a in col_axes] + [nd + 2]
    recv = jnp.transpose(recv, perm)
    return recv.reshape(c, m, n)


def _compute(a, old, keys, due, k, method, impl):
    """Each owner's refresh of its `c` matrices, one at a time: `(c, m, k)`, ok `(c,)`."""
    strategy = STRATEGIES[method]

    def one(args):
        a1, key_data, due1 = args[:3]
        old1 = args[3] if len(args) > 3 else None

        def compute():
            return strategy.basis(a1, old1, k, jax.random.wrap_key_data(key_data, impl=impl))

        return refresh_if_due(compute, a1, due1, (a1.shape[0], k))

    args = (a, keys, due) if old is None else (a, keys, due, old)
    return jax.lax.map(one, args)


def _return_rows(cand, rows, mesh_shape, owner_names):
    """Every device's rows of the owners' new bases, and where each slot's rows are.

    The rows (the basis' kept dimension) are sharded over `rows` and the bases replicated
    over the other owner axes: an all-to-all over `rows` hands each device its row block of
    the bases of the owners in its row group, then an all-gather over the other axes the
    ones of every other owner. No device builds more than one copy of its own bases.

    Returns:
      `(buffer, locate)`: `buffer` of shape `(others, row blocks, c, mb, k)`, `locate(slot)`
      the index of a slot's rows in it.
    """
    c, m, k = cand.shape
    row_names = tuple(rows)  # major first, as the blocks are numbered
    others = tuple(a for a in owner_names if a not in rows)
    n_blocks = math.prod(mesh_shape[a] for a in row_names)
    n_others = math.prod(mesh_shape[a] for a in others)
    mb = m // n_blocks
    buf = jnp.swapaxes(cand.reshape(c, n_blocks, mb, k), 0, 1)  # (row blocks, c, mb, k)
    if n_blocks > 1:
        buf = jax.lax.all_to_all(buf, row_names, 0, 0, tiled=False)
    if n_others > 1:
        buf = jax.lax.all_gather(buf, others, axis=0, tiled=False)
    else:
        buf = buf[None]

    def locate(slot: int) -> tuple[int, int, int]:
        owner, j = divmod(slot, c)
        coords = dict(
            zip(
                owner_names,
                np.unravel_index(owner, [mesh_shape[a] for a in owner_names]),
                strict=True,
            )
        )
        o = 0
        for a in others:  # mesh order, as all_gather numbers them
            o = o * mesh_shape[a] + int(coords[a])
        r = 0
        for a in row_names:
            r = r * mesh_shape[a] + int(coords[a])
        return o, r, j

    return buf, locate


def mesh_and_specs(refresh_shardings: Any) -> tuple[Any, dict[str, PartitionSpec]]:
    """The mesh and `{key path: PartitionSpec}` of a tree of `NamedSharding`s (None leaves:
    replicated).

    Raises:
      TypeError / ValueError: for other leaves, or shardings on different meshes.
    """
    flat = jax.tree.leaves_with_path(
        refresh_shardings, is_leaf=lambda x: x is None or isinstance(x, NamedSharding)
    )
    meshes, specs = [], {}
    for path, sharding in flat:
        if sharding is None:
            specs[path_str(path)] = PartitionSpec()
            continue
        if not isinstance(sharding, NamedSharding):
            raise TypeError(
                "refresh_shardings: expected a tree of jax.sharding.NamedSharding (the params' "
                f"shardings) with None for replicated leaves, got {sharding!r} at "
                f"{path_str(path)!r}."
            )
        meshes.append(sharding.mesh)
        specs[path_str(path)] = sharding.spec
    if not meshes:
        raise ValueError("refresh_shardings: no NamedSharding in the tree.")
    if any(m != meshes[0] for m in meshes):
        raise ValueError("refresh_shardings: the shardings are on different meshes.")
    return meshes[0], specs
