"""The optimizer inside the subspace: HF-style low-rank Adam (the default), or any optax one.

Both read the low-rank gradient `R` of every :class:`fira_optax.LowRankUpdate` node, keep their
state at the low-rank shapes, and set the node's direction `N`; dense (not projected) leaves
get the same optimizer at full size.
"""

from __future__ import annotations

from typing import Any, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from fira_optax._node import check_no_direction, is_low_rank
from fira_optax._shapes import per_matrix
from fira_optax._spec import ProjectionSpec, check_spec, path_str
from fira_optax._types import BiasCorrection, OnRefresh


class LowRankAdamState(NamedTuple):
    """State of :func:`scale_by_low_rank_adam`.

    Attributes:
      count: number of updates taken so far, `shape=(), dtype=int32` (the bias correction of
        the dense leaves; a projected matrix uses its own step count, carried by its node).
      mu: first moments, a tree like params: low-rank `(..., k, n)` / `(..., m, k)` for a
        projected leaf, the param's shape otherwise (dtype `mu_dtype` or float32).
      nu: second moments, same shapes as `mu`, float32.
    """

    count: jax.Array
    mu: Any
    nu: Any


def one_minus(x: jax.typing.ArrayLike) -> jax.Array:
    """`1 − x`, in float64 when `x` is a Python number (then rounded once to float32)."""
    if isinstance(x, (int, float)):
        return jnp.asarray(1.0 - float(x), jnp.float32)
    return 1.0 - jnp.asarray(x, jnp.float32)


def bias_correction(b1: jax.typing.ArrayLike, b2: jax.typing.ArrayLike, t: jax.Array) -> jax.Array:
    """`√(1 − b2^t) / (1 − b1^t)` with `1 − b^t = −expm1(t·log1p(−(1 − b)))`.

    Computed this way float32 keeps full relative accuracy (float32 `1 − 0.999**t` is off by
    1e-5), so the step size matches the float64 arithmetic of the PyTorch reference.
    """
    t = t.astype(jnp.float32)
    c1 = -jnp.expm1(t * jnp.log1p(-one_minus(b1)))
    c2 = -jnp.expm1(t * jnp.log1p(-one_minus(b2)))
    return jnp.sqrt(c2) / c1


#: `bias_correction` under another name, for `scale_by_low_rank_adam`, whose argument of that
#: name hides it.
adam_correction = bias_correction


def root_one_minus_power(b: jax.typing.ArrayLike, t: jax.Array) -> jax.Array:
    """`√(1 − b^t)` (the factor that turns `√v` into the bias-corrected `√v̂`), as above."""
    return jnp.sqrt(-jnp.expm1(t.astype(jnp.float32) * jnp.log1p(-one_minus(b))))


#: What a basis refresh does to the subspace Adam's moments.
ON_REFRESH = get_args(OnRefresh)

#: Where the subspace Adam puts ε and the bias correction.
BIAS_CORRECTIONS = get_args(BiasCorrection)


def _per_matrix_bias_corrections(b1, b2, leaves: list, counts=None, eps_scales=False) -> list:
    """`bias_correction` at every low-rank node's per-matrix step count (None for the other
    leaves), computed in one vectorized pass over all the matrices of the tree rather than
    a few scalar kernels per leaf.

    `counts(u)` picks the count (default: the node's step); with `eps_scales` each entry is a
    pair `(bias_correction, √(1 − b2^t))`."""
    counts = counts or (lambda u: u.step)
    steps = [counts(u) for u in leaves if is_low_rank(u)]
    if not steps:
        return [None] * len(leaves)
    flat = jnp.maximum(jnp.concatenate([jnp.ravel(s) for s in steps]), 1)
    values = bias_correction(b1, b2, flat)
    roots = root_one_minus_power(b2, flat) if eps_scales else None
    out, start = [], 0
    for u in leaves:
        if not is_low_rank(u):
            out.append(None)
            continue
        shape = counts(u).shape
        size = counts(u).size
        value = values[start : start + size].reshape(shape)
        if eps_scales:
            value = (value, roots[start : start + size].reshape(shape))
        out.append(value)
        start += size
    return out


def transported(mu: jax.Array, u: Any) -> jax.Array:
    """The first moment carried into the node's new basis, for the matrices refreshed on
    this step: `P_newᵀ P_old m` (left side, `m` is k×n) or `m P_old P_newᵀ` (right, m×k).
    A matrix whose basis did not change (or had none: its moment is still zero) keeps it."""
    old, new = u.previous_basis, u.basis
    mu32 = mu.astype(jnp.float32)
    refreshed = jnp.any(new != old, axis=(-2, -1))

    def move() -> jax.Array:
        if u.side == "left":  # bases (m, k)
            moved = (jnp.swapaxes(new, -1, -2) @ old) @ mu32
        else:  # bases (k, n)
            moved = mu32 @ (old @ jnp.swapaxes(new, -1, -2))
        return jnp.where(per_matrix(refreshed), moved, mu32)

    # The two m·k²-flop matmuls run only on a step where some basis changed.
    return jax.lax.cond(jnp.any(refreshed), move, lambda: mu32).astype(mu.dtype)


def _mismatch(block: str, path: str, kind: str, got: tuple, want: tuple) -> ValueError:
    return ValueError(
        f"{block}: leaf {path!r} receives a {kind} of shape {got} but its state has shape "
        f"{want}. Give every block the spec given to project() (fo.ProjectionSpec(...))."
    )


def scale_by_low_rank_adam(
    spec: ProjectionSpec,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    mu_dtype: Any = None,
    bias_correction: BiasCorrection = "hf",
    on_refresh: OnRefresh = "keep",
) -> optax.GradientTransformation:
    """Adam with moments in the projected space (HF/PyTorch-AdamW style).

    For a projected matrix with low-rank gradient `R` (from :func:`fira_optax.project`):

    .. math::
      m ← b_1 m + (1-b_1) R,\\quad v ← b_2 v + (1-b_2) R^2,\\quad
      N = m / (\\sqrt{v} + ε)

    `ε` is added to the *un-bias-corrected* `√v`; the bias correction
    `√(1-b_2^t)/(1-b_1^t)` is not applied to `N` (which Fira's norm scaling and limiter see) but
    carried as the node's `bias_correction`, applied by `project_back` to the whole update. Dense
    leaves (not projected) get the same step with `R = G`, bias correction included.

    With `bias_correction="torch"` (PyTorch's and optax's Adam, and the official FRUGAL code)
    the direction is bias-corrected and `ε` is added to the bias-corrected root:
    `N = m̂ / (\\sqrt{v̂} + ε)`, `m̂ = m / (1-b_1^t)`, `v̂ = v / (1-b_2^t)`; the node's
    `bias_correction` is left as it is. The two differ only by `ε` (by `ε·(1 − √(1-b_2^t))` in the
    denominator), but a state-free residual added by
    :func:`fira_optax.state_free_residual` is relative to the node's `bias_correction`: with
    "torch" its
    learning rate is the subspace's learning rate, not that times Adam's bias correction.

    **At a refresh** (`on_refresh`), on the step `project` refreshes a matrix's basis:

    - `"keep"` (Fira, GaLore): the moments stay as they are, in the old basis' coordinates;
    - `"reset"` (FRUGAL's `reset_statistics`): the moments restart from zero, and the bias
      correction counts the steps taken with the current basis (the node's `basis_age`)
      instead of all its steps, so the moments never mix the coordinates of two bases;
    - `"transport"` (GoLore): the first moment is carried into the new basis,
      `m ← P_newᵀ P_old m` (left side) or `m ← m P_old P_newᵀ` (right side); `v` is kept.

    Dense leaves are not affected.

    **Idle matrices.** A projected matrix whose gradient `G` is exactly zero (an expert
    that received no tokens, a layer frozen by zeroing its gradient) is treated as PyTorch
    treats a parameter whose `grad` is None: its moments are left untouched and its direction
    is zero, and its step count `t` (counted by `project`, carried by the node) does not
    advance, so idle steps are invisible to it: a layer unfrozen at step s trains exactly as if
    its optimizer started at s. A non-zero `G` with `R = 0` (orthogonal to the basis) is not
    idle: the moments decay and `N` follows them, as in the official code. Dense leaves follow
    optax/PyTorch Adam on a zero-valued gradient (the moments decay).

    The moments' shapes come from the spec: give this block the spec given to `project`; a
    mismatch raises a `ValueError` at trace time naming the leaf.

    Args:
      spec: the :class:`fira_optax.ProjectionSpec` given to `project` (with a rank).
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to `√v` (outside the root, before bias correction).
      mu_dtype: dtype of the first moment (default float32); `nu` is always float32.
      bias_correction: "hf" (the default: `ε` added to the raw `√v`, the correction carried
        as the node's `bias_correction`; Fira, GaLore) or "torch" (`N = m̂ / (√v̂ + ε)`; FRUGAL).
      on_refresh: what a refresh does to a matrix's moments: "keep" (the default; Fira,
        GaLore), "reset" (FRUGAL) or "transport" (GoLore); see above.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp, optax, fira_optax as fo
      >>> params = {"w": jnp.ones((8, 4))}
      >>> spec = fo.ProjectionSpec(rank=2, projected={"w": True})
      >>> tx = optax.chain(
      ...     fo.project(spec), fo.scale_by_low_rank_adam(spec, b1=0.9), fo.project_back()
      ... )
      >>> tx.init(params)[1].mu["w"].shape  # the first moment at the low-rank shape, m×k
      (8, 2)
    """
    spec = check_spec("scale_by_low_rank_adam", spec)
    mu_dtype = jnp.float32 if mu_dtype is None else jnp.dtype(mu_dtype)
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(
            f"Unknown bias_correction {bias_correction!r}; expected one of {BIAS_CORRECTIONS}."
        )
    torch_style = bias_correction == "torch"
    if on_refresh not in ON_REFRESH:
        raise ValueError(f"Unknown on_refresh {on_refresh!r}; expected one of {ON_REFRESH}.")
    reset_on_refresh = on_refresh == "reset"

    def init_fn(params):
        plans = spec.flat_plans(params)
        leaves, treedef = jax.tree.flatten(params)
        shapes = [
            p.shape if plan is None else plan.low_rank_shape
            for p, plan in zip(leaves, plans, strict=True)
        ]
        return LowRankAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=treedef.unflatten([jnp.zeros(s, mu_dtype) for s in shapes]),
            nu=treedef.unflatten([jnp.zeros(s, jnp.float32) for s in shapes]),
        )

    def update_fn(updates, state, params=None):
        del params
        count_inc = optax.safe_increment(state.count)
        b1_ = jnp.asarray(b1, jnp.float32)
        b2_ = jnp.asarray(b2, jnp.float32)

        def moments(g, mu, nu, active=None, fresh=None, eps_scale=None):
            """Adam's moments and `m / (√v + eps)`. With `active` (per matrix, bool), an
            inactive matrix keeps its moments bit for bit (decay 1, weight 0): the skip is
            folded into per-matrix coefficients, one fused pass over the moments rather than
            `where`s over them. `fresh` (per matrix, bool): the moments restart from zero
            (a refresh with `on_refresh="reset"`). `eps_scale` multiplies `eps` ("torch")."""
            d1, w1, d2, w2 = b1_, one_minus(b1), b2_, one_minus(b2)
            if active is not None:
                zero = jnp.zeros([], jnp.float32)
                d1, w1 = jnp.where(active, d1, 1.0), jnp.where(active, w1, zero)
                d2, w2 = jnp.where(active, d2, 1.0), jnp.where(active, w2, zero)
            mu = mu.astype(jnp.float32)
            if fresh is not None:  # a select, not a zero decay: also clears a non-finite mu
                mu, nu = jnp.where(fresh, 0.0, mu), jnp.where(fresh, 0.0, nu)
            mu = (d1 * mu + w1 * g).astype(mu_dtype)
            nu = d2 * nu + w2 * jnp.square(g)
            denominator_eps = eps if eps_scale is None else eps * eps_scale
            return mu, nu, mu.astype(jnp.float32) / (jnp.sqrt(nu) + denominator_eps)

        def step(path, u, mu, nu, correction):
            check_no_direction("scale_by_low_rank_adam", u)
            if not is_low_rank(u):
                if mu.shape != u.shape:
                    raise _mismatch(
                        "scale_by_low_rank_adam",
                        path_str(path),
                        "dense (not projected) gradient",
                        u.shape,
                        mu.shape,
                    )
                eps_scale = root_one_minus_power(b2, count_inc) if torch_style else None
                mu, nu, direction = moments(u.astype(jnp.float32), mu, nu, eps_scale=eps_scale)
                correction = adam_correction(b1, b2, count_inc)
                return (correction * direction).astype(u.dtype), mu, nu
            r = u.low_rank
            if r.shape != mu.shape:
                raise _mismatch(
                    "scale_by_low_rank_adam", u.plan.path, "low-rank gradient", r.shape, mu.shape
                )
            # An idle matrix (u.active False) keeps its moments and gets no direction.
            active = per_matrix(u.active)
            fresh = per_matrix(u.active & (u.basis_age == 1)) if reset_on_refresh else None
            if torch_style:
                correction, eps_scale = map(per_matrix, correction)
            else:
                correction, eps_scale = per_matrix(correction), None
            if on_refresh == "transport":
                mu = transported(mu, u)
            mu, nu, direction = moments(r, mu, nu, active, fresh, eps_scale)
            direction = direction * active.astype(jnp.float32)
            if torch_style:  # N = m̂ / (√v̂ + ε): the node's bias_correction is left as it is
                return u.replace(direction=direction * correction), mu, nu
            return (
                u.replace(direction=direction, bias_correction=u.bias_correction * correction),
                mu,
                nu,
            )

        flat_u, treedef = jax.tree.flatten_with_path(updates, is_leaf=is_low_rank)
        flat = [treedef.flatten_up_to(tree) for tree in (state.mu, state.nu)]
        nodes = [u for _, u in flat_u]
        if reset_on_refresh:
            for u in nodes:
                if is_low_rank(u) and u.basis_age is None:
                    raise ValueError(
                        f"scale_by_low_rank_adam(on_refresh='reset'): leaf {u.plan.path!r} "
                        "carries no basis age; it needs the node built by fo.project()."
                    )
        corrections = _per_matrix_bias_corrections(
            b1,
            b2,
            nodes,
            counts=(lambda u: u.basis_age) if reset_on_refresh else None,
            eps_scales=torch_style,
        )
        out = [
            step(p, u, m, v, c) for (p, u), m, v, c in zip(flat_u, *flat, corrections, strict=True)
        ]
        new = [treedef.unflatten([o[i] for o in out]) for i in range(3)]
        return new[0], LowRankAdamState(count=count_inc, mu=new[1], nu=new[2])

    return optax.GradientTransformation(init_fn, update_fn)


def _hold_idle(base: optax.GradientTransformation, updates: Any, old: Any, new: Any) -> Any:
    """The base optimizer's new state, with the old values kept for the idle matrices.

    The params-shaped parts of the state (`mu`, `nu`, `trace`, the factored vectors, ...) are
    found with `optax.tree_utils.tree_map_params`; in each, a state leaf of a projected
    matrix whose leading axes are the leaf's stack axes is taken per matrix from the old state
    where the matrix is idle. Other state leaves (step counts, ...) take the new values, and
    so does the whole state of a base optimizer whose `init` cannot run on optax's
    placeholder params.
    """
    if not any(is_low_rank(u) for u in jax.tree.leaves(updates, is_leaf=is_low_rank)):
        return new
    dense = object()  # marks state leaves that are not per-matrix
    actives = jax.tree.map(
        lambda u: u.active if is_low_rank(u) else dense, updates, is_leaf=is_low_rank
    )
    try:
        marks = optax.tree_utils.tree_map_params(
            base,
            lambda _, active: active,
            new,
            actives,
            transform_non_params=lambda subtree: jax.tree.map(lambda _: dense, subtree),
        )
    except (TypeError, ValueError, AttributeError):  # an init that computes on the params
        return new  # (the idle matrix still does not move: project_back zeroes its update)
    flat_new, treedef = jax.tree.flatten(new)
    flat_old = treedef.flatten_up_to(old)
    flat_marks = treedef.flatten_up_to(marks)

    def keep(active, n, o):
        if active is dense or not hasattr(n, "shape"):
            return n
        batch = active.shape
        if n.shape[: len(batch)] == batch:
            where = active.reshape(batch + (1,) * (n.ndim - len(batch)))
        else:  # a state leaf not laid out per matrix: kept only if every matrix is idle
            where = jnp.any(active)
        return jnp.where(where, n, o)

    return treedef.unflatten(
        [keep(a, n, o) for a, n, o in zip(flat_marks, flat_new, flat_old, strict=True)]
    )


class InSubspaceState(NamedTuple):
    """State of :func:`in_subspace`.

    Attributes:
      inner: the base optimizer's state, initialised on the low-rank stand-ins of the
        projected leaves (zeros of shape `(..., k, n)` / `(..., m, k)`) and on the other
        params as they are.
    """

    inner: Any


def in_subspace(
    spec: ProjectionSpec, base_optimizer: optax.GradientTransformation
) -> optax.GradientTransformation:
    """Runs any gradient-only optax transform inside the subspace.

    The base optimizer is initialised on the low-rank shapes, so its state is as small as the
    low-rank gradients (`optax.scale_by_rms()`: one `(k, n)`/`(m, k)` array per matrix;
    `optax.scale_by_factored_rms()`: two vectors). At every step it receives the tree of
    low-rank gradients `R` (dense gradients for the leaves that are not projected) and its
    output becomes each node's direction `N`; Fira's φ and limiter then apply unchanged.
    With `optax.identity()` (`N = R`, φ = ‖R‖ / (‖R‖ + 1e-8) ≈ 1), Fira's update is `G` (up
    to that 1e-8) while the limiter is inactive — on a step where the residual's norm grows
    more than γ× it scales the residual down — and GaLore's is `α·back(R)`.

    An idle matrix (its gradient exactly zero) keeps its part of the base optimizer's state
    bit for bit (the params-shaped parts of the state, found with
    `optax.tree_utils.tree_map_params`, are selected per matrix) and does not move
    (`project_back` gives it a zero update), so a momentum-type base (`optax.trace`,
    `scale_by_lion`, `scale_by_adam`) does not keep moving an expert that received no tokens.
    State that is not per parameter (a step count) still advances.

    The base optimizer must be gradient-only: `scale_by_adam`, `scale_by_rms`,
    `scale_by_factored_rms`, `scale_by_lion`, `scale_by_sign`, `identity`, ... As `params` it
    receives stand-ins (zeros at the low-rank shapes for the projected leaves — enough for
    transforms that read only shapes, like `scale_by_factored_rms` — and the params, or zeros
    without them, for the others), so put weight decay and the learning rate after
    `project_back`. Its own bias correction, if any, is part of `N` (the node's
    `bias_correction` stays 1).

    Args:
      spec: the :class:`fira_optax.ProjectionSpec` given to `project` (with a rank).
      base_optimizer: a gradient-only `optax.GradientTransformation`.

    Returns:
      An `optax.GradientTransformationExtraArgs` (extra arguments go to the base optimizer).

    Examples:
      >>> import jax.numpy as jnp, optax, fira_optax as fo
      >>> params = {"w": jnp.ones((8, 4))}
      >>> spec = fo.ProjectionSpec(rank=2, projected={"w": True})
      >>> tx = optax.chain(
      ...     fo.project(spec), fo.in_subspace(spec, optax.scale_by_rms()), fo.project_back()
      ... )
      >>> tx.init(params)[1].inner[0].nu["w"].shape  # RMSprop's state at the low-rank shape
      (8, 2)
    """
    spec = check_spec("in_subspace", spec)
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise TypeError(
            "in_subspace: base_optimizer must be an optax.GradientTransformation, got "
            f"{base_optimizer!r}: call in_subspace(spec, base_optimizer)."
        )
    base = optax.with_extra_args_support(base_optimizer)

    def standins(params):
        leaves, treedef = jax.tree.flatten(params)
        return treedef.unflatten(
            [
                p if plan is None else jnp.zeros(plan.low_rank_shape, jnp.float32)
                for p, plan in zip(leaves, spec.flat_plans(params), strict=True)
            ]
        )

    def init_fn(params):
        return InSubspaceState(inner=base.init(standins(params)))

    def update_fn(updates, state, params=None, **extra_args):
        plans = spec.flat_plans(updates)  # nodes are leaves with the dense update's shape
        for u, plan in zip(jax.tree.leaves(updates), plans, strict=True):
            check_no_direction("in_subspace", u)
            if is_low_rank(u) and (plan is None or plan.low_rank_shape != u.low_rank.shape):
                raise _mismatch(
                    "in_subspace",
                    u.plan.path,
                    "low-rank gradient",
                    u.low_rank.shape,
                    None if plan is None else plan.low_rank_shape,
                )
        inputs = jax.tree.map(
            lambda u: u.low_rank if is_low_rank(u) else u, updates, is_leaf=is_low_rank
        )
        # The base optimizer gets shape stand-ins as `params` (what shape-reading transforms
        # such as scale_by_factored_rms need): zeros at the low-rank shapes for the projected
        # leaves, the params themselves (or zeros) for the others.
        if params is None:
            params = jax.tree.map(jnp.zeros_like, inputs)
        else:
            params = jax.tree.map(
                lambda u, p: jnp.zeros_like(u.low_rank) if is_low_rank(u) else p,
                updates,
                params,
                is_leaf=is_low_rank,
            )
        outputs, inner = base.update(inputs, state.inner, params, **extra_args)
        inner = _hold_idle(base, updates, state.inner, inner)

        def merge(u, out):
            if not is_low_rank(u):
                return out
            if out.shape != u.low_rank.shape:
                raise _mismatch(
                    "in_subspace", u.plan.path, "direction", out.shape, u.low_rank.shape
                )
            return u.replace(direction=out.astype(jnp.float32))

        return jax.tree.map(merge, updates, outputs, is_leaf=is_low_rank), InSubspaceState(inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
