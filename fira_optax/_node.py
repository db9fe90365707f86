"""The update node that carries a projected leaf from `project` to `project_back`, guarded.

Imports only `_shapes` (the bottom of the package).

Between :func:`fira_optax.project` and :func:`fira_optax.project_back` a projected leaf of the
update tree is a :class:`LowRankUpdate`: the basis, the gradient, the low-rank gradient, the
direction the subspace optimizer chose and the residual's scale φ. It stands for the dense update
`project_back` will produce from it, and it is deliberately *not* a pytree node: `jax.tree.map`
sees it as one leaf, so a plain optax transform placed in that region gets the node itself,
never its fields (which it would corrupt). On the node,

- multiplying or dividing by a scalar (what `optax.scale`, `optax.scale_by_learning_rate`,
  `optax.scale_by_schedule` do) acts as it would on the dense leaves at the same place: before
  the subspace optimizer it scales the gradient (`G` and `R`), after it the update (exactly);
- anything else (adding it to an array, `jnp`/`lax` functions, clipping, `apply_updates`)
  fails at trace time with a message that names the block order and `project_back`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fira_optax._shapes import LeafPlan

ORDER = (
    "project → subspace optimizer (scale_by_low_rank_adam / in_subspace) → "
    "norm_scale_residual (Fira; norm_scale_gradient for APOLLO) → limit_norm_growth → "
    "project_back, then dense transforms "
    "(clipping, weight decay, learning rate) and optax.apply_updates"
)


def _is_scalar(x: Any) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.number)):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype") and tuple(x.shape) == ()


class _NodeType(type):
    """The class of :class:`LowRankUpdate`, whose `str()` says what to do.

    A node returned from a `jax.jit`-ed function (a chain without `project_back` under
    `jax.jit(tx.update)`) fails in JAX's output check with "returned a value of type {type}
    at output component {path}, which is not a valid JAX type": JAX formats the class with
    `str()`, so the message names the leaf (the path) and the fix (this text). `repr()` of
    the class is the usual one.
    """

    def __str__(cls) -> str:
        return (
            "fira_optax.LowRankUpdate (a projected leaf, as it is between "
            "fo.project() and fo.project_back(): did you forget fo.project_back() at the end "
            "of the fira_optax blocks?)"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class LowRankUpdate(metaclass=_NodeType):
    """A projected leaf of the update tree, between `project` and `project_back`.

    It stands for the dense update `c · (α·back(N) + S)` (`c` is `bias_correction`, α is
    `alpha`, `back(X)` the plain back-projection: `P X` on the left side, `X P` on the right),
    with the residual `S = φ ⊙ (G − α·back(R))` kept implicit (as its per-row/column scale
    `phi`) so that `project_back` builds it with one matmul and one elementwise pass. All
    arrays are in the leaf's matrix view `(*batch, m, n)` (see
    :class:`fira_optax.DimensionNumbers`). After :func:`fira_optax.norm_scale_gradient`
    (APOLLO) α is 0 and the node stands for `c · φ ⊙ G`, with no matmul at all
    (`back_projected` is False). After :func:`fira_optax.state_free_residual` with
    `rule="sign"` (FRUGAL's signSGD) the residual is `S = φ ⊙ sign(G − α·back(R))`
    (`residual_sign` is True), which is not linear in `G`: `project_back` then builds
    `back(R)` explicitly (one more matmul and an m×n temporary).

    A subspace optimizer reads `low_rank` and sets `direction` (`node.replace(direction=...)`,
    which also marks the node as carrying a direction). Scalar multiplication scales what the
    node stands for at that point — the gradient before the subspace optimizer, the update
    after it — as it would a dense leaf; any other use as an array raises.

    Attributes:
      basis: `P`, float32, `(..., m, k)` (left) or `(..., k, n)` (right).
      previous_basis: the basis before this step's refresh (the same array when no matrix
        of the leaf was refreshed), for subspace optimizers that carry their state into the
        new basis.
      grad: the full gradient `G` in matrix view `(..., m, n)`, in the param's dtype.
      low_rank: `R`, the projected gradient, float32, `(..., k, n)` or `(..., m, k)`.
      direction: the low-rank direction `N` (`R` until a subspace optimizer sets it).
      phi: `φ`, the residual's scale, broadcastable against `G` (`(..., 1, n)` left,
        `(..., m, 1)` right), or None when the residual is dropped (GaLore).
      alpha: α, the scale of the low-rank terms `α·back(·)` (`project`'s `scale`; 0 after
        :func:`fira_optax.norm_scale_gradient`).
      bias_correction: `c`, the bias-corrected step factor that multiplies the whole dense
        update (Adam's `√(1-β₂ᵗ)/(1-β₁ᵗ)`, a scalar or one per matrix `(..., 1, 1)`; 1 from
        `project`; APOLLO's `√scale` and scalar multiplication of the node land here too).
      step: per matrix `(...)`, int32: the steps this matrix has taken, this one included
        (idle steps — an exactly zero gradient — do not count).
      active: per matrix `(...)`, bool: False for an idle matrix (its whole gradient `G` is
        exactly zero this step; a gradient orthogonal to the basis, `R = 0`, is active);
        set once by `project`.
      plan: the static :class:`LeafPlan` (key path, matrix view, side, k).
      has_direction: whether a subspace optimizer has set `direction` (static).
      orthonormal: whether the basis is orthonormal (static; False for the "random"
        refresh and for a user's callable), which the limiter's fast residual norm needs.
      back_projected: whether the update has low-rank terms `α·back(·)` (static). False
        after :func:`fira_optax.norm_scale_gradient`, which sets α = 0: the update is
        `c · φ ⊙ G`, and the limiter and `project_back` skip the basis.
      residual_sign: whether the residual is `S = φ ⊙ sign(G − α·back(R))` (static; set by
        :func:`fira_optax.state_free_residual` with `rule="sign"`) instead of
        `φ ⊙ (G − α·back(R))`.
      basis_age: per matrix `(...)`, int32: the steps this matrix has taken with its current
        basis, this one included (1 on the step `project` refreshed it); set by `project`.
        A subspace optimizer that resets its state at a refresh
        (`scale_by_low_rank_adam(on_refresh="reset")`) reads it.
    """

    basis: jax.Array
    previous_basis: jax.Array
    grad: jax.Array
    low_rank: jax.Array
    direction: jax.Array
    phi: jax.Array | None
    alpha: jax.Array
    bias_correction: jax.Array
    step: jax.Array
    active: jax.Array
    plan: LeafPlan
    has_direction: bool = False
    orthonormal: bool = True
    back_projected: bool = True
    residual_sign: bool = False
    basis_age: jax.Array | None = None

    def replace(self, **kwargs: Any) -> LowRankUpdate:
        if "direction" in kwargs:
            kwargs.setdefault("has_direction", True)
        return dataclasses.replace(self, **kwargs)

    def __repr__(self) -> str:
        # Shown by JAX when a jnp/lax function is handed the node: say what to do.
        return (
            f"LowRankUpdate(leaf {self.plan.path!r}, shape {self.shape}: a projected leaf "
            "between fo.project() and fo.project_back(), where only fira_optax blocks and "
            "scalar scaling are defined; move this transform after fo.project_back())"
        )

    @property
    def side(self) -> str:
        return self.plan.side

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense update (the leaf's)."""
        return self.plan.view.shape

    @property
    def dtype(self) -> Any:
        """The dtype of the dense update (the gradient's)."""
        return self.grad.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # -- scalar scaling: defined -----------------------------------------------------------

    def _scaled(self, factor: Any) -> LowRankUpdate:
        factor = jnp.asarray(factor, jnp.float32)
        if self.has_direction:  # an update: scale it (exactly, via the step factor)
            return self.replace(bias_correction=self.bias_correction * factor)
        # A gradient (before the subspace optimizer): scale G and R, as on a dense gradient.
        low_rank = self.low_rank * factor
        return dataclasses.replace(
            self,
            grad=(self.grad * factor).astype(self.grad.dtype),
            low_rank=low_rank,
            direction=low_rank,
        )

    def __mul__(self, other: Any) -> LowRankUpdate:
        if _is_scalar(other):
            return self._scaled(other)
        self._misuse(f"multiplied by a non-scalar {type(other).__name__}")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> LowRankUpdate:
        if _is_scalar(other):
            return self._scaled(1.0 / jnp.asarray(other, jnp.float32))
        self._misuse(f"divided by a non-scalar {type(other).__name__}")

    def __neg__(self) -> LowRankUpdate:
        return self._scaled(-1.0)

    def __pos__(self) -> LowRankUpdate:
        return self

    # -- everything else: a clear error -----------------------------------------------------

    def _misuse(self, what: str) -> None:
        raise TypeError(
            f"fira_optax.LowRankUpdate of leaf {self.plan.path!r} was {what}. A projected leaf "
            "is a LowRankUpdate between fo.project() and fo.project_back(); there only "
            "fira_optax blocks and multiplication by a scalar (optax.scale, "
            "scale_by_learning_rate, scale_by_schedule) are defined on it. Keep the order "
            f"{ORDER}: move this transform after fo.project_back() (or did you forget "
            "fo.project_back()?)."
        )

    def _binary(name: str) -> Callable[..., Any]:
        def method(self, other):
            self._misuse(f"used in `{name}` with a {type(other).__name__}")

        return method

    __add__ = _binary("+")
    __radd__ = _binary("+")
    __sub__ = _binary("-")
    __rsub__ = _binary("-")
    __rtruediv__ = _binary("/")
    __pow__ = _binary("**")
    __rpow__ = _binary("**")
    __matmul__ = _binary("@")
    __rmatmul__ = _binary("@")
    __lt__ = _binary("<")
    __le__ = _binary("<=")
    __gt__ = _binary(">")
    __ge__ = _binary(">=")
    del _binary

    def __abs__(self):
        self._misuse("passed to abs()")

    def __array__(self, *args, **kwargs):
        self._misuse("converted to a NumPy array")

    def __bool__(self):
        self._misuse("used as a boolean")

    def __iter__(self):
        self._misuse("iterated over")

    def __getitem__(self, index):
        self._misuse("indexed")

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the node does not have: array methods (`astype`,
        # `real`, `reshape`, ...) that a dense transform would call.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            self._misuse(f"asked for the array attribute `.{name}`")
        except TypeError as e:
            raise AttributeError(str(e)) from None


def is_low_rank(x: Any) -> bool:
    return isinstance(x, LowRankUpdate)


#: The subspace optimizers, as the order checks name them.
SUBSPACE_OPTIMIZERS = "a subspace optimizer (scale_by_low_rank_adam or in_subspace)"


def check_no_direction(block: str, u: Any) -> None:
    """For a subspace optimizer: raises when the node already carries a direction (a second
    subspace optimizer, or one placed after norm_scale_residual). Dense leaves pass."""
    if is_low_rank(u) and u.has_direction:
        raise ValueError(
            f"{block}: leaf {u.plan.path!r} already carries a direction from "
            f"{SUBSPACE_OPTIMIZERS}: a chain has exactly one, right after fo.project(). "
            f"Keep the order {ORDER}."
        )


def check_residual_order(block: str, u: Any) -> None:
    """For norm_scale_residual / norm_scale_gradient: raises unless the node carries a subspace
    optimizer's direction and no residual scale yet. Dense leaves pass."""
    if not is_low_rank(u):
        return
    if not u.has_direction:
        raise ValueError(
            f"{block}: leaf {u.plan.path!r} has no direction yet: put {block}() after "
            f"{SUBSPACE_OPTIMIZERS} (φ compares its direction with the low-rank gradient). "
            f"Keep the order {ORDER}."
        )
    if u.phi is not None:
        raise ValueError(
            f"{block}: leaf {u.plan.path!r} already has a residual scale: put {block}() once, "
            f"before limit_norm_growth(). Keep the order {ORDER}."
        )


def map_nodes(fn: Callable[..., Any], updates: Any, *rest: Any) -> Any:
    """Maps `fn(node, *rest_leaves)` over the projected leaves; dense leaves pass through."""

    def apply(u, *r):
        return fn(u, *r) if is_low_rank(u) else u

    return jax.tree.map(apply, updates, *rest, is_leaf=is_low_rank)
