"""optax's own label masks and any pytree: `multi_transform`, `partition`, `masked`, nnx.

Every alias and the block chain run on trees with dict / list / tuple / NamedTuple /
registered-dataclass nodes, `None` leaves and `optax.MaskedNode`; inside
`optax.multi_transform` the projected kernels follow exactly the trajectory of
`fo.fira(projected=<same mask>)` on the whole tree.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import block_chain
from _roundoff import ROUND_OFF, assert_round_off
from jax.sharding import Mesh, NamedSharding

import fira_optax as fo

RANK, GAP = 4, 3


class Layer(NamedTuple):
    kernel: jax.Array
    bias: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dense:
    kernel: jax.Array
    bias: jax.Array


def _w(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


TREES = {
    "tuple": lambda: (_w(0, (16, 8)), _w(1, (8,))),
    "list": lambda: [_w(0, (16, 8)), _w(1, (8,)), [_w(2, (8, 12))]],
    "namedtuple": lambda: {"layer": Layer(_w(0, (16, 8)), _w(1, (8,)))},
    "dataclass": lambda: {"dense": Dense(_w(0, (16, 8)), _w(1, (8,))), "out": _w(2, (8, 12))},
    "none_leaves": lambda: {"w": _w(0, (16, 8)), "frozen": None, "b": _w(1, (8,))},
    "masked_node": lambda: {"w": _w(0, (16, 8)), "skip": optax.MaskedNode(), "b": _w(1, (8,))},
    "nested": lambda: (
        {"a": [Layer(_w(0, (2, 16, 8)), None)]},
        Dense(_w(1, (12, 20)), _w(2, (20,))),
    ),
}

OPTIMIZERS = {
    "fira": lambda: fo.fira(1e-2, RANK, update_proj_gap=GAP, weight_decay=0.1),
    "galore": lambda: fo.galore(1e-2, RANK, update_proj_gap=GAP),
    "golore": lambda: fo.golore(1e-2, RANK, update_proj_gap=GAP, svd_steps=GAP),
    "frugal": lambda: fo.frugal(1e-2, RANK, update_proj_gap=GAP, weight_decay=0.1),
    "apollo": lambda: fo.apollo(1e-2, RANK, update_proj_gap=GAP, weight_decay=0.1),
    "apollo_mini": lambda: fo.apollo_mini(1e-2, update_proj_gap=GAP),
    "fira_randomized": lambda: fo.fira(1e-2, RANK, update_proj_gap=GAP, refresh="randomized"),
    "blocks": lambda: optax.chain(block_chain(RANK, GAP, 0.25), optax.scale(-1e-2)),
    "rms_subspace": lambda: fo.fira(1e-2, RANK, base_optimizer=optax.scale_by_rms()),
}


def _grads(params, step):
    return jax.tree.map(lambda p: jnp.cos(p * (step + 1.0)) + 0.1 * step, params)


@pytest.mark.parametrize(
    "opt",  # the fast tier: Fira on every tree kind; the other optimizers are slow
    [pytest.param(o, marks=() if o == "fira" else pytest.mark.slow) for o in sorted(OPTIMIZERS)],
)
@pytest.mark.parametrize("tree", sorted(TREES))
def test_any_pytree(tree, opt):
    params = TREES[tree]()
    tx = OPTIMIZERS[opt]()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(GAP + 1):  # across a refresh
        updates, state = update(_grads(params, step), state, params)
        chex.assert_trees_all_equal_structs(updates, params)
        chex.assert_tree_all_finite(updates)
        params = optax.apply_updates(params, updates)
    # Every projected leaf has its low-rank basis in the state.
    rank = 1 if opt == "apollo_mini" else RANK  # APOLLO-Mini: rank 1
    plans = jax.tree.leaves(fo.ProjectionSpec(rank).plans(params))
    shapes = {x.shape for x in jax.tree.leaves(state)}
    assert plans and all(plan.basis_shape in shapes for plan in plans)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_state_shardings_on_any_pytree(tree):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params = TREES[tree]()
    specs = jax.tree.map(lambda p: jax.sharding.PartitionSpec(), params)
    for tx in (OPTIMIZERS["fira"](), OPTIMIZERS["blocks"]()):
        shardings = fo.optimizer_state_shardings(tx, params, specs, mesh=mesh)
        state = jax.jit(tx.init, out_shardings=shardings)(params)
        assert jax.tree.structure(state) == jax.tree.structure(shardings)
        assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))


def _model_params(d=16, f=40, v=50):
    """A small transformer-like tree: embedding, attention/MLP kernels, norms, head."""
    shapes = {
        "embed": {"embedding": (v, d)},
        "blocks": [
            {
                "attn": {"q": {"kernel": (d, d)}, "o": {"kernel": (d, d)}},
                "mlp": {"up": {"kernel": (d, f)}, "down": {"kernel": (f, d)}},
                "norm": {"scale": (d,)},
            }
            for _ in range(2)
        ],
        "lm_head": {"kernel": (d, v)},
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return treedef.unflatten([_w(i, s) for i, s in enumerate(leaves)])


def _run(tx, params, steps=7):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for step in range(steps):  # refreshes at steps 1, 4, 7
        updates, state = update(_grads(params, step), state, params)
        out.append(updates)
    return out


@pytest.mark.parametrize(
    "wrapper", [pytest.param("multi_transform", marks=pytest.mark.slow), "partition"]
)
def test_multi_transform_trajectory_equals_projected_mask(wrapper):
    params = _model_params()
    mask = fo.projected_mask(params, fo.ProjectionSpec(RANK))
    labels = jax.tree.map(lambda m: "low_rank" if m else "adam", mask)
    kwargs = dict(update_proj_gap=GAP, scale=0.25, weight_decay=0.01)
    make = getattr(optax, wrapper)
    tx = make(
        {"low_rank": fo.fira(1e-2, RANK, **kwargs), "adam": optax.adamw(3e-3, weight_decay=0.1)},
        labels,
    )
    whole = fo.fira(1e-2, RANK, projected=mask, **kwargs)
    for got, want in zip(_run(tx, params), _run(whole, params), strict=True):
        kernels = lambda u: [
            x for x, m in zip(jax.tree.leaves(u), jax.tree.leaves(mask), strict=True) if m
        ]
        # A sub-tree vs the whole tree: two programs, float32 round-off.
        assert_round_off(kernels(got), kernels(want), ROUND_OFF, wrapper)


def test_masked_projects_only_the_mask_and_passes_the_rest_through():
    params = _model_params()
    mask = fo.projected_mask(params, fo.ProjectionSpec(RANK))
    tx = optax.masked(fo.fira(1e-2, RANK, update_proj_gap=GAP), mask)
    whole = fo.fira(1e-2, RANK, update_proj_gap=GAP, projected=mask)
    state = tx.init(params)
    for step, want in enumerate(_run(whole, params, steps=4)):
        grads = _grads(params, step)
        got, state = jax.jit(tx.update)(grads, state, params)
        for g, w, x, m in zip(*map(jax.tree.leaves, (got, want, grads, mask)), strict=True):
            if m:  # a sub-tree vs the whole tree: two programs, float32 round-off
                assert_round_off(g, w, ROUND_OFF, f"step {step + 1}")
            else:  # passed through untouched
                chex.assert_trees_all_equal(g, x)


def test_two_fira_groups_with_different_ranks():
    """Attention at rank 2 and the MLP at rank 8, by labels, each its own spec and state."""
    params = _model_params()
    labels = jax.tree.map_with_path(
        lambda path, _: (
            "attn"
            if "attn" in jax.tree_util.keystr(path)
            else "mlp"
            if "mlp" in jax.tree_util.keystr(path)
            else "rest"
        ),
        params,
    )
    tx = optax.multi_transform(
        {"attn": fo.fira(1e-2, 2), "mlp": fo.fira(1e-2, 8), "rest": optax.adamw(1e-3)}, labels
    )
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
    chex.assert_tree_all_finite(updates)
    bases = optax.tree_utils.tree_get(state.inner_states["attn"], "bases")
    assert bases["blocks"][0]["attn"]["q"]["kernel"].shape == (2, 16)
    bases = optax.tree_utils.tree_get(state.inner_states["mlp"], "bases")
    assert bases["blocks"][1]["mlp"]["up"]["kernel"].shape == (16, 8)


@pytest.mark.slow  # a docs page, as the slow pages of test_docs.py
def test_docs_label_recipe_runs():
    """The docs' label-mask recipe (Fira on kernels, AdamW on embeddings/head/norms)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "building_blocks.md").read_text()
    blocks = re.findall(r"```python\n(# Recipe: label masks.*?)```", page, re.S)
    assert len(blocks) == 1, "docs/building_blocks.md lost its label-mask recipe"
    namespace = {"params": _model_params(d=256, f=512, v=300)}
    exec(blocks[0], namespace)
    tx = namespace["tx"]
    labels = jax.tree.leaves(namespace["labels"])
    assert labels.count("fira") == 8 and labels.count("adamw") == 4, labels
    state = tx.init(namespace["params"])
    updates, _ = jax.jit(tx.update)(_grads(namespace["params"], 0), state, namespace["params"])
    chex.assert_tree_all_finite(updates)


# ----------------------------------------------------------------------------------------------
# flax: nnx.Optimizer(..., wrt=...) and a Linen param tree.

nnx = pytest.importorskip("flax.nnx")


class TinyNNX(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(30, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(16, 32, rngs=rngs)
        self.head = nnx.Linear(32, 30, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(x)
        return self.head(jax.nn.gelu(self.mlp(x)))


def _nnx_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("wrt", ["param", pytest.param("subset", marks=pytest.mark.slow)])
def test_nnx_optimizer_with_wrt(wrt):
    model = TinyNNX(nnx.Rngs(0))
    filt = nnx.Param if wrt == "param" else nnx.All(nnx.Param, nnx.PathContains("attn"))
    optimizer = nnx.Optimizer(model, fo.fira(1e-2, 4, update_proj_gap=2), wrt=filt)
    snapshot = lambda: jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.Param)))
    before = snapshot()
    tokens = jnp.arange(2 * 9).reshape(2, 9) % 30

    @nnx.jit
    def step(model, optimizer, tokens):
        grads = nnx.grad(_nnx_loss, argnums=nnx.DiffState(0, filt))(model, tokens)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer, tokens)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, snapshot())
    flat = {jax.tree_util.keystr(p): c for p, c in jax.tree.leaves_with_path(changed)}
    assert any(flat.values())
    if wrt == "subset":
        assert all(c == ("attn" in k) for k, c in flat.items()), flat
    # The attention kernels (16, 2, 8) / (2, 8, 16) are projected as 16×16 matrices.
    bases = jax.tree.leaves(optax.tree_utils.tree_get(optimizer.opt_state, "bases"))
    assert any(b.shape == (4, 16) for b in bases)
