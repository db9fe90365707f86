"""Test configuration: strict numpy rank promotion, as in optimistix."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
