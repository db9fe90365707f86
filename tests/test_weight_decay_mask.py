"""`mask=` of the weight decay, with `optax.adamw`'s semantics, on every alias that decays.

A pytree of bools like params (or a prefix of it) or a callable `params -> that pytree`;
True: the leaf is decayed. It combines with the rule that idle matrices are not decayed, and
the default (None) decays every leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fira_optax as fo

PARAMS = {
    "w": jax.random.normal(jax.random.key(0), (16, 8)),  # projected
    "u": jax.random.normal(jax.random.key(1), (8, 16)),  # projected
    "b": jnp.linspace(1.0, 2.0, 8),  # dense
}
PROJECTED = {"w": True, "u": True, "b": False}
WD = 0.5

ALIASES = {
    "fira": lambda **kw: fo.fira(1e-2, 4, projected=PROJECTED, **kw),
    "galore": lambda **kw: fo.galore(1e-2, 4, projected=PROJECTED, **kw),
    "golore": lambda **kw: fo.golore(1e-2, 4, projected=PROJECTED, **kw),
    "apollo": lambda **kw: fo.apollo(1e-2, 4, projected=PROJECTED, **kw),
    "apollo_mini": lambda **kw: fo.apollo_mini(1e-2, projected=PROJECTED, **kw),
    "frugal": lambda **kw: fo.frugal(1e-2, 4, projected=PROJECTED, **kw),
    "lr_and_decay": lambda **kw: fo.scale_by_learning_rate_and_decay(1e-2, **kw),
}
# The fast tier: the three ways the decay is built (Fira's chain, FRUGAL's, the bare block);
# the other aliases build it as Fira does and are slow.
ALIAS_PARAMS = [
    pytest.param(name, marks=() if name in ("fira", "frugal", "lr_and_decay") else pytest.mark.slow)
    for name in ALIASES
]


def _grads(idle=()):
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, PARAMS)
    return {k: jnp.zeros_like(g) if k in idle else g for k, g in grads.items()}


def _updates(tx, grads=None):
    grads = _grads() if grads is None else grads
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    updates, state = update(grads, state, PARAMS)  # two steps: past every first step
    updates, _ = update(grads, state, PARAMS)
    return updates


def _assert_leaf(got, want, leaf):
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-6, atol=1e-9, err_msg=leaf)


def _assert_differs(got, want, leaf):
    assert not np.allclose(got[leaf], want[leaf], rtol=1e-6, atol=1e-9), leaf


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_mask_excludes_a_leaf_from_decay(name):
    make = ALIASES[name]
    decayed = _updates(make(weight_decay=WD))
    plain = _updates(make())
    masked = _updates(make(weight_decay=WD, mask={"w": False, "u": True, "b": False}))
    _assert_leaf(masked, plain, "w")  # masked out: as without decay
    _assert_leaf(masked, plain, "b")
    _assert_leaf(masked, decayed, "u")  # kept: decayed as without a mask
    _assert_differs(masked, decayed, "w")


@pytest.mark.parametrize("name", ["fira", "frugal", "lr_and_decay"])
def test_callable_mask_equals_its_tree(name):
    make = ALIASES[name]
    matrices = lambda params: jax.tree.map(lambda p: p.ndim == 2, params)
    by_callable = _updates(make(weight_decay=WD, mask=matrices))
    by_tree = _updates(make(weight_decay=WD, mask=matrices(PARAMS)))
    for leaf in PARAMS:
        _assert_leaf(by_callable, by_tree, leaf)
    _assert_leaf(by_callable, _updates(make()), "b")  # the 1-D leaf is not decayed


@pytest.mark.parametrize("name", ["fira", "frugal", "lr_and_decay"])
def test_default_mask_decays_every_leaf(name):
    make = ALIASES[name]
    default = _updates(make(weight_decay=WD))
    everything = _updates(make(weight_decay=WD, mask=jax.tree.map(lambda _: True, PARAMS)))
    plain = _updates(make())
    for leaf in PARAMS:
        _assert_leaf(default, everything, leaf)
        _assert_differs(default, plain, leaf)


def test_mask_as_a_prefix_of_params():
    params = {"layer": {"w": PARAMS["w"], "b": PARAMS["b"]}, "head": PARAMS["u"]}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)

    def run(**kw):
        tx = fo.fira(1e-2, 4, **kw)
        return jax.jit(tx.update)(grads, tx.init(params), params)[0]

    prefix = run(weight_decay=WD, mask={"layer": False, "head": True})
    full = run(weight_decay=WD, mask={"layer": {"w": False, "b": False}, "head": True})
    for got, want in zip(jax.tree.leaves(prefix), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(got, want)


def test_mask_and_idle_matrices_combine():
    """An idle matrix is not decayed even when the mask selects it; a masked-out active one
    is not decayed either."""
    make = ALIASES["fira"]
    grads = _grads(idle=("u",))
    masked = _updates(make(weight_decay=WD, mask={"w": False, "u": True, "b": True}), grads)
    plain = _updates(make(), grads)
    np.testing.assert_array_equal(masked["u"], 0.0)  # idle: no step, no decay
    _assert_leaf(masked, plain, "w")


def test_mask_that_does_not_match_params_names_the_fix():
    tx = fo.fira(1e-2, 4, weight_decay=WD, mask={"w": True})
    with pytest.raises(ValueError, match="mask: expected a pytree of bools like params"):
        tx.update(_grads(), tx.init(PARAMS), PARAMS)
