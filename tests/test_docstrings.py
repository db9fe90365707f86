"""The examples in the public docstrings run and print what they claim."""

import doctest

import pytest

from fira_optax import _alias, _describe, _sharding


@pytest.mark.parametrize("module", [_alias, _describe, _sharding])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_public_api_is_exactly_all():
    import fira_optax

    public = {n for n in dir(fira_optax) if not n.startswith("_")}
    assert public == set(fira_optax.__all__)
    assert fira_optax.__all__ == sorted(fira_optax.__all__)
