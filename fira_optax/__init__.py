"""fira_optax: Fira and GaLore as composable Optax transforms.

Full-rank training under a low-rank optimizer-state constraint (Chen et al., 2024,
arXiv:2410.01623), matching the official `fira==1.0.2` / `galore-torch==1.0` code; APOLLO and
APOLLO-Mini (Zhu et al., 2024, arXiv:2412.05270) from the same blocks, matching
`apollo-torch==1.0.3`.

The modules follow the flow of one step, bottom-up: `_types` (the string options),
`_shapes` (matrix view of a leaf, side rule) and `_node` (the guarded update node) at the
bottom; `_spec` (the shared `ProjectionSpec`); the blocks `_project` (+ `_refresh`: how a
basis is refreshed, `_schedule`: when, `_distributed`: where, on a mesh) → `_subspace` →
`_residual` → `_limiter` → `_project_back`; on top `_alias` (+ `_apollo`), `_describe` and
`_sharding`.
"""

from fira_optax._alias import ScaleByLearningRateState as ScaleByLearningRateState
from fira_optax._alias import fira as fira
from fira_optax._alias import galore as galore
from fira_optax._alias import golore as golore
from fira_optax._alias import scale_by_fira as scale_by_fira
from fira_optax._alias import scale_by_galore as scale_by_galore
from fira_optax._alias import scale_by_golore as scale_by_golore
from fira_optax._alias import (
    scale_by_learning_rate_and_decay as scale_by_learning_rate_and_decay,
)
from fira_optax._apollo import apollo as apollo
from fira_optax._apollo import apollo_mini as apollo_mini
from fira_optax._apollo import scale_by_apollo as scale_by_apollo
from fira_optax._describe import describe_projection as describe_projection
from fira_optax._describe import projected_mask as projected_mask
from fira_optax._frugal import frugal as frugal
from fira_optax._frugal import scale_by_frugal as scale_by_frugal
from fira_optax._limiter import LimitNormGrowthState as LimitNormGrowthState
from fira_optax._limiter import limit_norm_growth as limit_norm_growth
from fira_optax._node import LowRankUpdate as LowRankUpdate
from fira_optax._project import ProjectState as ProjectState
from fira_optax._project import project as project
from fira_optax._project_back import project_back as project_back
from fira_optax._residual import norm_scale_gradient as norm_scale_gradient
from fira_optax._residual import norm_scale_residual as norm_scale_residual
from fira_optax._residual import state_free_residual as state_free_residual
from fira_optax._shapes import DimensionNumbers as DimensionNumbers
from fira_optax._sharding import optimizer_state_shardings as optimizer_state_shardings
from fira_optax._spec import ProjectionSpec as ProjectionSpec
from fira_optax._subspace import InSubspaceState as InSubspaceState
from fira_optax._subspace import LowRankAdamState as LowRankAdamState
from fira_optax._subspace import in_subspace as in_subspace
from fira_optax._subspace import scale_by_low_rank_adam as scale_by_low_rank_adam

__version__ = "0.2.0"

__all__ = [
    "DimensionNumbers",
    "InSubspaceState",
    "LimitNormGrowthState",
    "LowRankAdamState",
    "LowRankUpdate",
    "ProjectState",
    "ProjectionSpec",
    "ScaleByLearningRateState",
    "apollo",
    "apollo_mini",
    "describe_projection",
    "fira",
    "frugal",
    "galore",
    "golore",
    "in_subspace",
    "limit_norm_growth",
    "norm_scale_gradient",
    "norm_scale_residual",
    "optimizer_state_shardings",
    "project",
    "project_back",
    "projected_mask",
    "scale_by_apollo",
    "scale_by_fira",
    "scale_by_frugal",
    "scale_by_galore",
    "scale_by_golore",
    "scale_by_learning_rate_and_decay",
    "scale_by_low_rank_adam",
    "state_free_residual",
]
