"""Comparing two differently built computations of the same maths to float32 round-off.

Bitwise equality holds by construction only for the same compiled computation: a jitted
function run twice, a resume from a checkpoint, op-by-op (eager) runs of the same ops on equal
inputs, exact identities (a select, a multiplication by 1 or by a power of 2). Two differently
built computations — a block chain vs the alias, jit vs op by op, a wrapper or a sub-tree vs the
whole tree, a 3-D leaf vs its matrix — compile to different XLA programs: other fusions, FMA
contraction and summation orders, which also depend on the CPU's vector code (SSE4.2, AVX2,
AVX-512). They agree to float32 round-off of the computation, amplified by its conditioning.

The error of a computed entry is bounded relative to the size of the terms it is made of (an
entry that is small by cancellation, e.g. in G − back(R), keeps an absolute error of the
order of its terms), so the comparison is relative to the leaf's largest entry.
"""

from __future__ import annotations

import jax
import numpy as np

#: float32 machine epsilon (one ulp of 1).
EPS = float(np.finfo(np.float32).eps)

#: One optimizer update is ~10–20 float32 ops deep (projection matmul, Adam, φ, back matmul,
#: residual, weight decay), each off by ≲ 1 ulp of its largest term between two compilations,
#: and carried over a few steps in the moments: ~1e-7 of the leaf's largest entry (one or two
#: ulps, as measured). 1e-6 (~8 ulps) leaves a margin where nothing ill-conditioned amplifies it
#: (the refresh's SVD sees the same gradient in both) and is ~5 orders of magnitude below what
#: a real error gives (a wrong scale, a missing residual, a wrongly masked leaf: O(1)).
ROUND_OFF = 1e-6


def max_rel_error(got, want) -> tuple[float, str]:
    """Over the float leaves of two equal-structure trees: the largest
    `max|got − want| / max|want|` (in float64) and the leaf's key path. Non-float leaves
    (counts, flags) must be equal."""
    worst, where = 0.0, ""
    flat, _ = jax.tree_util.tree_flatten_with_path(got)
    for (path, a), b in zip(flat, jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (jax.tree_util.keystr(path), a.shape, b.shape)
        if not np.issubdtype(b.dtype, np.inexact):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
            continue
        if a.size == 0:
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        scale = np.abs(b).max()
        err = np.abs(a - b).max() / scale if scale > 0 else np.abs(a).max()
        if np.isnan(err) or err > worst:  # a NaN sticks (and fails the bound)
            worst, where = float(err), jax.tree_util.keystr(path)
    return worst, where


def assert_round_off(got, want, bound: float = ROUND_OFF, what: str = "") -> None:
    """Every float leaf of `got` within `bound` of `want`, relative to the leaf's largest
    entry (non-float leaves equal)."""
    err, where = max_rel_error(got, want)
    assert err <= bound, f"{what} {where}: max|got − want| / max|want| = {err:.2e} > {bound:.0e}"
