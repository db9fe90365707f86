"""Library tests run with strict numpy rank promotion (as in optimistix).

A fixture, not a global `jax.config.update`, so that the examples' tests (collected in the
same session) keep jax's default.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield
