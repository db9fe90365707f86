"""Device mesh, parameter / optimizer-state / batch shardings for the LLaMA example.

The mesh has three axes (as in MaxText and nanodo):

* ``data``: pure data parallelism (params and optimizer state replicated),
* ``fsdp``: data parallelism with the params and optimizer state sharded (ZeRO-3 / FSDP),
* ``tensor``: Megatron-style tensor parallelism.

``--mesh fsdp=4,tensor=2`` sets the sizes (``parse_mesh``): axes left out have size 1, one
axis may be ``-1`` (the rest of the devices), the product must equal the device count. The
default (``None`` or ``""``) puts every device on ``data``; on one device that is a
1×1×1 mesh, numerically the single-device run.

Parameters are sharded by a per-kernel rule on their path (``param_partition_spec``): the
``d_model`` axis of every matrix over ``fsdp`` and its other axis (heads, FFN, vocabulary)
over ``tensor`` — column-parallel ``q/k/v/gate/up`` ``(d, out)`` → ``P("fsdp", "tensor")``,
row-parallel ``o/down`` ``(in, d)`` → ``P("tensor", "fsdp")``, ``embed`` ``(V, d)`` →
``P("tensor", "fsdp")``, ``lm_head`` ``(d, V)`` → ``P("fsdp", "tensor")``; norm scales are
replicated; stacked ``(L, m, n)`` leaves (``scan_layers``) get a leading ``None``. An axis
whose size is not divisible by its mesh axis is replicated instead, so every config runs on
every mesh. The optimizer state follows its params through
``fira_optax.optimizer_state_shardings``; the batch is split over ``("data", "fsdp")``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the param path without layer indices, partition of its trailing matrix axes).
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/(q|k|v)_proj/kernel$", ("fsdp", "tensor")),  # (d, H*K): column parallel
    (r"attn/o_proj/kernel$", ("tensor", "fsdp")),  # (H*K, d): row parallel
    (r"mlp/(gate|up)_proj/kernel$", ("fsdp", "tensor")),  # (d, F)
    (r"mlp/down_proj/kernel$", ("tensor", "fsdp")),  # (F, d)
    (r"^embed/embedding$", ("tensor", "fsdp")),  # (V, d)
    (r"^lm_head/kernel$", ("fsdp", "tensor")),  # (d, V)
    (r"(^|/)scale$", ()),  # RMSNorm scales (d,) / (L, d): replicated
)


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """Axis sizes from ``"fsdp=4,tensor=2"``; see the module docstring for the rules."""
    sizes: dict[str, int] = {}
    for item in (spec or "").replace(" ", "").split(","):
        if not item:
            continue
        name, sep, raw = item.partition("=")
        if not sep or name not in AXES:
            raise ValueError(
                f"Bad mesh entry {item!r} in {spec!r}: expected AXIS=SIZE, AXIS in {AXES}."
            )
        if name in sizes:
            raise ValueError(f"Mesh axis {name!r} given twice in {spec!r}.")
        try:
            size = int(raw)
        except ValueError:
            raise ValueError(f"Bad mesh size {raw!r} for axis {name!r} in {spec!r}.") from None
        if size < 1 and size != -1:
            raise ValueError(f"Mesh axis {name!r} must have size >= 1 (or -1), got {size}.")
        sizes[name] = size
    if not sizes:
        sizes["data"] = -1
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {fill} in {spec!r}.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"Mesh {spec!r}: {num_devices} devices are not divisible by {known} "
                f"(the product of the other axes)."
            )
        sizes[fill[0]] = num_devices // known
    out = {name: sizes.get(name, 1) for name in AXES}
    if math.prod(out.values()) != num_devices:
        raise ValueError(
            f"Mesh {spec!r} = {out} has {math.prod(out.values())} devices, but there are "
            f"{num_devices}: the axis sizes must multiply to the device count "
            f"(use -1 for one axis to take the rest)."
        )
    return out


def make_mesh(spec: str | Mesh | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all, every process)."""
    if isinstance(spec, Mesh):
        return spec
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[name] for name in AXES)
    # jax.make_mesh orders the devices by the physical topology (TPU ICI rings, hosts).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def describe_mesh(mesh: Mesh) -> str:
    sizes = ",".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"mesh {sizes} ({mesh.size} devices, {jax.process_count()} process(es))"


def _key_name(key: Any) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    raise TypeError(f"Unexpected pytree key {key!r}")


def path_tuple(path: Sequence[Any]) -> tuple[str | int, ...]:
    """A key path as plain names / indices, without nnx's trailing ``.value``."""
    keys = tuple(_key_name(k) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


def param_partition_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The rule's ``PartitionSpec`` for the param at ``path`` (``"layers/0/attn/q_proj/kernel"``).

    Axes not divisible by their mesh axis are replicated; params no rule matches are
    replicated (the example's model has none).
    """
    name = re.sub(r"/\d+/", "/", path)  # layers/3/attn/... -> layers/attn/...
    axes: tuple[str | None, ...] = ()
    for pattern, rule in PARAM_RULES:
        if re.search(pattern, name):
            axes = rule
            break
    if len(axes) > len(shape):
        raise ValueError(f"Rule {axes} has more axes than the param {path} {tuple(shape)}.")
    axes = (None,) * (len(shape) - len(axes)) + tuple(axes)  # stacked (L, m, n): lead None
    spec = [a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)]
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A tree like ``params`` (arrays or ``ShapeDtypeStruct``s) of ``NamedSharding``s."""

    def one(path, x):
        name = "/".join(str(k) for k in path_tuple(path))
        return NamedSharding(mesh, param_partition_spec(name, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def gather_for_compute(params: Any, mesh: Mesh) -> Any:
    """``params`` (inside jit) constrained to their rule's sharding without ``fsdp``.

    FSDP's all-gather: the forward and backward passes see every weight whole along the
    ``fsdp`` axis (still split over ``tensor``), so the batch stays split over
    ``("data", "fsdp")`` and no activation is gathered; the gradient of this constraint
    comes back in the gathered layout and is reduce-scattered to the param's sharding by
    the train step. XLA schedules each gather near its use.
    """

    def one(path, x):
        name = "/".join(str(k) for k in path_tuple(path))
        spec = param_partition_spec(name, x.shape, mesh)
        spec = P(*(None if a == "fsdp" else a for a in spec))
        return NamedSharding(mesh, spec)

    return jax.lax.with_sharding_constraint(params, jax.tree_util.tree_map_with_path(one, params))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    """Shards axis ``batch_axis`` of an ``ndim``-D batch over ``("data", "fsdp")``."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


@functools.lru_cache(maxsize=64)
def _process_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Indices along ``axis`` of the rows this process's devices hold, in order."""
    spans = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = index[axis].indices(shape[axis])
        spans.add((start, stop))
    return np.concatenate([np.arange(start, stop) for start, stop in sorted(spans)])


def host_to_global(batch: Any, sharding: NamedSharding, batch_axis: int) -> jax.Array:
    """The global batch array from the host's copy of the global batch (numpy).

    Every process passes the same global batch (a pure function of (seed, step)); each keeps
    only the rows its devices hold and builds the global array with
    ``jax.make_array_from_process_local_data`` — no process sends data to another one. A
    ``jax.Array`` is returned as it is.
    """
    if isinstance(batch, jax.Array):
        return batch
    batch = np.asarray(batch)
    rows = _process_rows(sharding, batch.shape, batch_axis)
    local = batch if len(rows) == batch.shape[batch_axis] else batch.take(rows, axis=batch_axis)
    return jax.make_array_from_process_local_data(sharding, local, batch.shape)


def opt_state_shardings(tx: Any, params: Any, param_sh: Any) -> dict[tuple, NamedSharding]:
    """``fira_optax.optimizer_state_shardings`` of ``tx``'s state, keyed by leaf path."""
    import fira_optax as fo

    tree = fo.optimizer_state_shardings(tx, params, param_sh)
    return {path_tuple(p): s for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}
