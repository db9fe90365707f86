"""When each projected matrix refreshes its basis: the official and the staggered schedule.

Imports `_shapes` and `_refresh` (for the cost of a refresh).

Every projected matrix counts its own steps `s` (the steps it took before this one; idle steps,
an exactly zero gradient, do not count — see :func:`fira_optax.project`). With `T =
update_proj_gap`:

- **official** (the default, `fira==1.0.2` / `galore-torch==1.0`): a matrix refreshes when
  `s mod T = 0`, i.e. at its steps 1, T+1, 2T+1, … — on non-degenerate input every matrix of
  the model refreshes on the same step, which then carries every SVD of the model.
- **staggered** (opt-in): each matrix `j` has an offset `o_j ∈ {0, …, T−1}` and refreshes when
  `s = 0` (its first step: it cannot train without a basis) or `s mod T = o_j`. After the
  first step every matrix still refreshes exactly once per window of `T` steps (its basis is
  never older than `T` steps), but the refreshes are spread over the window so that each step
  carries about `1/T` of the refresh work.

The offsets are deterministic functions of the projected matrices (shapes, key paths, order
within a stack), not random: the matrices are sorted by decreasing refresh cost `c_j` (ties by
key path, then stack index) and placed greedily (longest-processing-time first) on the phase
whose summed cost is lowest. When there are at most `T` matrices every phase holds at most one
and they are spread evenly over the window (`o = ⌊i·T/N⌋` for the i-th of `N`). The cost
counts the work of one refresh, so that each step carries about the same work, not the same
number of leaves: `m·n·min(m, n)` for the exact SVD (the thin SVD costs the same whatever k),
`m·n·(k + oversample)` for the randomized refresh (each strategy's `cost`,
`_refresh.STRATEGIES`). The offsets depend only on the projected
matrices a transform sees: a Fira group inside `optax.multi_transform` gets the same offsets
as `fo.fira(projected=mask)` on the whole tree.
"""

from __future__ import annotations

import heapq
import math
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np

from fira_optax._refresh import Refresh, refresh_cost
from fira_optax._shapes import LeafPlan
from fira_optax._types import RefreshSchedule

SCHEDULES = get_args(RefreshSchedule)


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown refresh_schedule {schedule!r}; expected one of {SCHEDULES}.")


def offsets(plans: list[LeafPlan | None], gap: int, method: Refresh) -> list[np.ndarray | None]:
    """The staggered offsets: per projected leaf an int32 array of its stack shape, in `[0, T)`.

    Args:
      plans: the leaves' plans (None for leaves that are not projected), in tree order.
      gap: T, the refresh period.
      method: the refresh strategy (its cost, `_refresh.refresh_cost`, weighs a matrix).

    Returns:
      A list aligned with `plans`: None for leaves that are not projected.
    """
    matrices = []  # (−cost, path, index within the stack, leaf number)
    for leaf, plan in enumerate(plans):
        if plan is None:
            continue
        cost = refresh_cost(plan.view.m, plan.view.n, plan.k, method)
        for index in range(math.prod(plan.batch_shape)):
            matrices.append((-cost, plan.path, index, leaf))
    matrices.sort()
    phase_of = {}
    if len(matrices) <= gap:
        for i, (_, _, index, leaf) in enumerate(matrices):
            phase_of[leaf, index] = (i * gap) // len(matrices)
    else:
        heap = [(0, phase) for phase in range(gap)]  # (summed cost, phase)
        for neg_cost, _, index, leaf in matrices:
            load, phase = heapq.heappop(heap)
            phase_of[leaf, index] = phase
            heapq.heappush(heap, (load - neg_cost, phase))
    out: list[np.ndarray | None] = []
    for leaf, plan in enumerate(plans):
        if plan is None:
            out.append(None)
            continue
        size = math.prod(plan.batch_shape)
        flat = np.array([phase_of[leaf, i] for i in range(size)], np.int32)
        out.append(flat.reshape(plan.batch_shape))
    return out


def due(steps: jax.Array, gap: int, offset: np.ndarray | None) -> jax.Array:
    """Per matrix, whether it refreshes on this step (before `steps` counts this step).

    `offset=None` is the official schedule `s mod T = 0`; otherwise the staggered one,
    `s = 0 or s mod T = o`.
    """
    if offset is None:
        return steps % gap == 0
    return (steps == 0) | (steps % gap == jnp.asarray(offset, steps.dtype))


def basis_age(steps: jax.Array, gap: int, offset: np.ndarray | None) -> jax.Array:
    """Per matrix, the steps it will have taken with its current basis after this one, this
    one included (`steps` counts the steps before this one): 1 when it is :func:`due`.

    Official schedule: `s mod T + 1`. Staggered: `s + 1` before the first offset (the basis of
    the first step), then `(s − o) mod T + 1`.
    """
    if offset is None:
        return steps % gap + 1
    offset = jnp.asarray(offset, steps.dtype)
    return jnp.where(steps < offset, steps, (steps - offset) % gap) + 1
