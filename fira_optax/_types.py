"""The string options of the blocks and optimizers, as `Literal` types.

The bottom of the package, with `_checks`: this module imports nothing from `fira_optax`. Each
block checks its option at construction time against the tuple of the same values
(`typing.get_args` of the type below) and raises a `ValueError` naming them.
"""

from __future__ import annotations

from typing import Literal

#: The side rule: "std" (right if m ≥ n else left), "reverse_std", "left" or "right".
ProjType = Literal["std", "reverse_std", "left", "right"]

#: How a basis is refreshed (a callable is the other choice; see `fira_optax.project`).
RefreshMethod = Literal["svd", "randomized", "random", "random_orthonormal"]

#: When a matrix refreshes: every matrix together, or each at its own offset.
RefreshSchedule = Literal["official", "staggered"]

#: What a refresh does to the subspace Adam's moments.
OnRefresh = Literal["keep", "reset", "transport"]

#: Where the subspace Adam puts ε and the bias correction.
BiasCorrection = Literal["hf", "torch"]

#: APOLLO's scale: one per channel (row or column of G), or one per matrix.
ScaleType = Literal["channel", "tensor"]

#: FRUGAL's state-free rule for the residual: signSGD or SGD.
StateFreeRule = Literal["sign", "sgd"]
