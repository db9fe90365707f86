"""How a leaf is read as (a stack of) matrices, the side rule, and the low-rank shapes.

The bottom of the package: this module imports only `_types` from `fira_optax`.

A projected leaf of any rank is read through a :class:`MatrixView`: its axes are split into
batch axes (a stack: scanned layers, experts), row axes (the matrix's `m`, a layer's input
axes) and column axes (`n`, its output axes), and the leaf is transposed and reshaped to
`(*batch, m, n)`. Projection code then works on `grad_mxn` with `k = min(rank, m, n)`:

- left side:  `basis_mxk = U[:, :k]`,  `low_rank_kxn = basis_mxkᵀ @ grad_mxn`
- right side: `basis_kxn = Vh[:k, :]`, `low_rank_mxk = grad_mxn @ basis_kxnᵀ`
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any, get_args

import jax
import jax.numpy as jnp

from fira_optax._types import ProjType

PROJ_TYPES = get_args(ProjType)
LEFT, RIGHT = "left", "right"


def _axes(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    axes = (value,) if isinstance(value, int) else tuple(value)
    out = []
    for axis in axes:
        axis = operator.index(axis)
        if not -ndim <= axis < ndim:
            raise ValueError(f"{what} {axis} is out of range for a leaf with {ndim} axes.")
        out.append(axis % ndim)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
    """Which axes of a leaf form the rows, the columns and the stack of its matrices.

    The leaf is read as `(*batch, m, n)` with `m = ∏ shape[reduction_axis]` (a layer's input
    axes) and `n = ∏ shape[output_axis]` (its output axes), one matrix per index of the batch
    axes. The field names follow `optax.contrib.GaLoreDimensionNumbers`, whose instances are
    accepted wherever this class is.

    Examples: a Linen `DenseGeneral(features=(8, 64))` kernel `(512, 8, 64)` is
    `DimensionNumbers(0, (1, 2))` (a 512×512 matrix); an attention output kernel
    `(8, 64, 512)` is `DimensionNumbers((0, 1), 2)`; a conv kernel `(3, 3, 64, 128)` is
    `DimensionNumbers((0, 1, 2), 3)`; MaxText's scanned `(embed, layers, heads, head_dim)` is
    `DimensionNumbers(0, (2, 3), batch_axis=1)`.

    Attributes:
      reduction_axis: the row axes (int or sequence of ints).
      output_axis: the column axes.
      batch_axis: the stack axes (default none).
    """

    reduction_axis: int | Sequence[int] = 0
    output_axis: int | Sequence[int] = 1
    batch_axis: int | Sequence[int] = ()

    def view(self, shape: tuple[int, ...]) -> MatrixView:
        """The :class:`MatrixView` of a leaf of `shape` (validated)."""
        ndim = len(shape)
        rows = _axes(self.reduction_axis, ndim, "reduction_axis")
        cols = _axes(self.output_axis, ndim, "output_axis")
        batch = _axes(self.batch_axis, ndim, "batch_axis")
        every = batch + rows + cols
        if not rows or not cols:
            raise ValueError(f"{self}: reduction_axis and output_axis must not be empty.")
        if sorted(every) != list(range(ndim)):
            raise ValueError(
                f"{self} does not split the {ndim} axes of shape {shape} into disjoint batch, "
                "reduction and output axes that cover every axis."
            )
        return MatrixView(tuple(shape), batch, rows, cols)


def as_dimension_numbers(x: Any) -> DimensionNumbers:
    """A `DimensionNumbers` from ours or from optax's `GaLoreDimensionNumbers`."""
    if isinstance(x, DimensionNumbers):
        return x
    if hasattr(x, "reduction_axis") and hasattr(x, "output_axis"):
        return DimensionNumbers(x.reduction_axis, x.output_axis, getattr(x, "batch_axis", ()))
    raise TypeError(f"Expected fira_optax.DimensionNumbers, got {x!r}.")


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A leaf of `shape` read as the matrices `(*batch, m, n)` (static, hashable).

    Attributes:
      shape: the leaf's shape.
      batch_axes: the leaf's axes that index the stack, in order.
      row_axes: the axes merged (row-major) into `m`.
      col_axes: the axes merged into `n`.
    """

    shape: tuple[int, ...]
    batch_axes: tuple[int, ...]
    row_axes: tuple[int, ...]
    col_axes: tuple[int, ...]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.batch_axes)

    @property
    def m(self) -> int:
        return math.prod(self.shape[a] for a in self.row_axes)

    @property
    def n(self) -> int:
        return math.prod(self.shape[a] for a in self.col_axes)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.m, self.n)

    @property
    def _perm(self) -> tuple[int, ...]:
        return self.batch_axes + self.row_axes + self.col_axes

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """`(*shape) -> (*batch, m, n)`: a free reshape when the axes are already in order."""
        perm = self._perm
        if perm != tuple(range(len(perm))):
            x = jnp.transpose(x, perm)
        return x.reshape(self.matrix_shape)

    def from_matrix(self, y: jax.Array) -> jax.Array:
        """`(*batch, m, n) -> (*shape)`, the inverse of :meth:`to_matrix`."""
        perm = self._perm
        y = y.reshape(tuple(self.shape[a] for a in perm))
        if perm != tuple(range(len(perm))):
            y = jnp.transpose(y, tuple(perm.index(i) for i in range(len(perm))))
        return y

    def describe(self) -> str:
        """E.g. `512×(8·64)`, `3 × 64×64` (a stack of 3)."""

        def group(axes):
            dims = [str(self.shape[a]) for a in axes]
            return dims[0] if len(dims) == 1 else "(" + "·".join(dims) + ")"

        matrix = f"{group(self.row_axes)}×{group(self.col_axes)}"
        if not self.batch_axes:
            return matrix
        return f"{'·'.join(str(d) for d in self.batch_shape)} × {matrix}"


# ----------------------------------------------------------------------------------------------
# The side rule and the low-rank shapes.


def check_proj_type(proj_type: str) -> None:
    if proj_type == "full":
        raise ValueError(
            "proj_type='full' (two-sided projection) is not supported: the official Fira code "
            "crashes on it and the residual it leaves is not defined by the paper. Use one of "
            f"{PROJ_TYPES}."
        )
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"Unknown proj_type {proj_type!r}; expected one of {PROJ_TYPES}.")


def side_for(m: int, n: int, proj_type: ProjType) -> str:
    """Which side an m×n matrix is projected on.

    | proj_type   | m ≥ n | m < n |
    | std         | right | left  |
    | reverse_std | left  | right |
    | left/right  | left/right    |
    """
    check_proj_type(proj_type)
    if proj_type in (LEFT, RIGHT):
        return proj_type
    tall = m >= n
    if proj_type == "std":
        return RIGHT if tall else LEFT
    return LEFT if tall else RIGHT


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one projected leaf is projected (static, hashable).

    Attributes:
      path: the leaf's '/'-joined key path (for messages).
      view: the leaf read as matrices.
      side: "left" or "right".
      k: the rank of each matrix's basis, `min(rank, m, n)`; None when the spec has no rank
        (a block that only needs the stack shape, the limiter's keyword form).
    """

    path: str
    view: MatrixView
    side: str
    k: int | None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.view.batch_shape

    @property
    def basis_shape(self) -> tuple[int, ...]:
        m, n, k = self.view.m, self.view.n, self.k
        return (*self.batch_shape, m, k) if self.side == LEFT else (*self.batch_shape, k, n)

    @property
    def low_rank_shape(self) -> tuple[int, ...]:
        m, n, k = self.view.m, self.view.n, self.k
        return (*self.batch_shape, k, n) if self.side == LEFT else (*self.batch_shape, m, k)

    @property
    def rank_axis(self) -> int:
        return rank_axis(self.side)


def low_rank_state_size(view: MatrixView, rank: int, proj_type: ProjType) -> int:
    """Elements of Fira's per-leaf state: basis, two low-rank moments, the limiter scalar."""
    m, n = view.m, view.n
    k = min(rank, m, n)
    kept, other = (n, m) if side_for(m, n, proj_type) == RIGHT else (m, n)
    return math.prod(view.batch_shape) * (k * kept + 2 * k * other + 1)


def rank_axis(side: str) -> int:
    """The axis of the low-rank gradient that indexes the basis vectors (the k axis)."""
    return -2 if side == LEFT else -1


def project_matrix(grad_mxn: jax.Array, basis: jax.Array, side: str) -> jax.Array:
    """The low-rank gradient `R`: `Pᵀ G` (left, k×n) or `G Pᵀ` (right, m×k), in float32.

    Written as plain matmuls with the (small) basis transposed, not as einsums contracting a
    leading axis: XLA:CPU lowers the latter to a slower generic dot (measured 1.6× on
    512×1376, rank 128; `benchmarks/RESULTS.md`).
    """
    basis_t = jnp.swapaxes(basis.astype(grad_mxn.dtype), -1, -2)
    if side == LEFT:
        return jnp.matmul(basis_t, grad_mxn, preferred_element_type=jnp.float32)
    return jnp.matmul(grad_mxn, basis_t, preferred_element_type=jnp.float32)


def back_matrix(low_rank: jax.Array, basis: jax.Array, side: str) -> jax.Array:
    """`P X` (left) or `X P` (right), without the scale α."""
    if side == LEFT:
        return jnp.matmul(basis, low_rank)
    return jnp.matmul(low_rank, basis)


def per_matrix(x: jax.Array) -> jax.Array:
    """A per-matrix quantity `(*batch)` made broadcastable against `(*batch, m, n)`."""
    return x[..., None, None] if jnp.ndim(x) else x


def active(grad_mxn: jax.Array, keepdims: bool = False) -> jax.Array:
    """Per matrix of `(*batch, m, n)`, whether it steps: its gradient is not exactly zero (an
    idle matrix — an expert without tokens, a frozen layer — is skipped, as PyTorch skips a
    parameter whose `grad` is None)."""
    return jnp.any(grad_mxn != 0, axis=(-2, -1), keepdims=keepdims)
