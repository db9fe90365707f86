"""The matrix view of a leaf ("dimension numbers") and the default rule built on it.

Multi-head and conv kernels are one matrix (input axes × output axes), only real stacks
(scanned layers, experts) are stacks, biases are never projected, and no leaf is projected at
a loss (its low-rank state must be smaller than AdamW's).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _roundoff import ROUND_OFF, assert_round_off
from jax.sharding import PartitionSpec as P

import fira_optax as fo
from fira_optax._spec import default_view
from fira_optax._testing import state_bytes

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")


def views(params, rank=64, **kw):
    plans = fo.ProjectionSpec(rank, **kw).plans(params)
    flat = jax.tree.leaves_with_path(plans, is_leaf=lambda x: x is None)
    return {fo._spec.path_str(p): (None if x is None else x.view.describe()) for p, x in flat}


@pytest.mark.parametrize(
    "path, shape, expected",
    [
        ("mlp/up/kernel", (512, 1376), "512×1376"),
        ("attn/query/kernel", (512, 8, 64), "512×(8·64)"),
        ("attn/key/kernel", (512, 2, 64), "512×(2·64)"),  # GQA
        ("attn/out/kernel", (8, 64, 512), "(8·64)×512"),
        ("conv/kernel", (3, 3, 64, 128), "(3·3·64)×128"),
        ("stem/kernel", (7, 7, 3, 64), "(7·7·3)×64"),
        ("layers/attn/q_proj/kernel", (4, 128, 128), "4 × 128×128"),  # nnx.scan / nn.scan
        ("layers/mha/query/kernel", (4, 512, 8, 64), "4 × 512×(8·64)"),
        ("layers/0/attn/query/kernel", (512, 8, 64), "512×(8·64)"),  # a list: no stack
        ("moe/experts/wi", (8, 64, 256), "8 × 64×256"),
        ("layers/moe/experts/kernel", (4, 8, 64, 256), "4·8 × 64×256"),
        ("w", (3, 24, 16), "3 × 24×16"),  # not a kernel: a stack over leading axes
        ("bias", (8,), None),
    ],
)
def test_default_view(path, shape, expected):
    view = default_view(path, shape)
    assert (None if view is None else view.describe()) == expected


def test_view_round_trip_with_a_batch_axis_in_the_middle():
    """MaxText's scanned kernel (embed, layers, heads, head_dim): batch axis 1."""
    dims = fo.DimensionNumbers(reduction_axis=0, output_axis=(2, 3), batch_axis=1)
    view = dims.view((16, 3, 4, 8))
    x = jnp.arange(16 * 3 * 4 * 8, dtype=jnp.float32).reshape(16, 3, 4, 8)
    m = view.to_matrix(x)
    chex.assert_shape(m, (3, 16, 32))
    chex.assert_trees_all_equal(m[1], x[:, 1].reshape(16, 32))
    chex.assert_trees_all_equal(view.from_matrix(m), x)


@pytest.mark.parametrize(
    "dims, match",
    [
        (fo.DimensionNumbers(0, 1), "cover every axis"),
        (fo.DimensionNumbers(0, (1, 2), batch_axis=1), "disjoint"),
        (fo.DimensionNumbers(5, 1), "out of range"),
    ],
)
def test_bad_dimension_numbers(dims, match):
    params = {"k": jnp.zeros((4, 5, 6))}
    with pytest.raises(ValueError, match=match):
        fo.fira(1e-2, 2, dimension_numbers={"k": dims}).init(params)


def test_multi_head_kernel_trains_like_its_matrix():
    """A (d, heads, head_dim) kernel under the default view ≡ the (d, heads·head_dim) matrix."""
    d, h, hd = 32, 4, 8
    w = jax.random.normal(jax.random.key(0), (d, h * hd))
    tx = fo.fira(1e-2, 6, update_proj_gap=2, scale=0.25)
    s3, s2 = tx.init({"kernel": w.reshape(d, h, hd)}), tx.init({"kernel": w})
    for t in range(4):
        g = jax.random.normal(jax.random.key(t + 1), (d, h * hd))
        u3, s3 = jax.jit(tx.update)({"kernel": g.reshape(d, h, hd)}, s3)
        u2, s2 = jax.jit(tx.update)({"kernel": g}, s2)
        # The 3-D leaf's program (reshapes around the same maths) vs the matrix's: float32
        # round-off.
        assert_round_off(u3["kernel"].reshape(d, h * hd), u2["kernel"], ROUND_OFF, f"step {t + 1}")


@pytest.mark.parametrize(
    "dims",
    [
        {"attn/w": fo.DimensionNumbers((0, 1), 2)},  # regex dict
        lambda params: {"attn": {"w": fo.DimensionNumbers((0, 1), 2)}, "b": None},
        {"attn": {"w": fo.DimensionNumbers((0, 1), 2)}, "b": None},
    ],
    ids=["regex", "callable", "tree"],
)
def test_dimension_number_overrides(dims):
    """An (heads, head_dim, d) leaf not named `kernel` is a stack by default; override it."""
    params = {"attn": {"w": jnp.ones((8, 4, 32))}, "b": jnp.ones(32)}
    assert views(params, rank=8)["attn/w"] is None  # 8 stacked 4×32: not smaller than AdamW
    assert views(params, rank=8, dimension_numbers=dims)["attn/w"] == "(8·4)×32"


def test_optax_galore_dimension_numbers_are_accepted():
    from optax.contrib import GaLoreDimensionNumbers

    params = {"attn": {"w": jnp.ones((8, 4, 32))}}
    dims = {"attn/w": GaLoreDimensionNumbers(reduction_axis=(0, 1), output_axis=2)}
    assert views(params, rank=8, dimension_numbers=dims)["attn/w"] == "(8·4)×32"


def test_never_a_bias_norm_or_a_leaf_projected_at_a_loss():
    params = {
        "attn": {"query": {"kernel": jnp.ones((64, 4, 16)), "bias": jnp.ones((4, 16))}},
        "ln": {"scale": jnp.ones((3, 64))},
        "tiny": {"kernel": jnp.ones((64, 4))},  # rank 8 ≥ 4: state 4·(4+2·64)+1 > 2·256
        "empty": {"kernel": jnp.ones((0, 16))},
    }
    got = views(params, rank=8)
    assert got == {
        "attn/query/bias": None,
        "attn/query/kernel": "64×(4·16)",
        "ln/scale": None,
        "tiny/kernel": None,
        "empty/kernel": None,
    }
    # An explicit choice is honoured (no size check), but a zero-size leaf passes through.
    mask = {
        "attn": {"query": {"kernel": True, "bias": False}},
        "ln": {"scale": False},
        "tiny": {"kernel": True},
        "empty": {"kernel": True},
    }
    got = views(params, rank=8, projected=mask)
    assert got["tiny/kernel"] == "64×4" and got["empty/kernel"] is None
    tx = fo.fira(1e-2, 8, projected=mask)
    updates, _ = tx.update(params, tx.init(params), params)
    chex.assert_trees_all_equal_shapes(updates, params)


def test_state_of_multi_head_attention_is_at_most_half_of_adamw():
    """Attention kernels viewed as matrices: nnx.MultiHeadAttention(8 heads, 512) and Linen
    DenseGeneral(features=(8, 64)) at rank 64 keep a state ≤ 0.5× AdamW's."""
    mha = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=nnx.Rngs(0))
    mha_params = nnx.state(mha, nnx.Param)
    dense = linen.DenseGeneral(features=(8, 64))
    dense_params = jax.eval_shape(dense.init, jax.random.key(0), jnp.ones((1, 512)))
    ratios = {}
    for name, params in [("nnx.MultiHeadAttention", mha_params), ("DenseGeneral", dense_params)]:
        tx = fo.fira(1e-3, 64)
        ratios[name] = state_bytes(tx, params) / state_bytes(optax.adamw(1e-3), params)
        print(f"{name}: fira state / adamw state = {ratios[name]:.3f}")
        print(fo.describe_projection(params, fo.ProjectionSpec(64)))
    assert ratios["nnx.MultiHeadAttention"] <= 0.5, ratios
    assert ratios["DenseGeneral"] <= 0.5, ratios


def test_linen_multi_head_attention_views():
    mha = linen.MultiHeadDotProductAttention(num_heads=8)
    x = jnp.ones((1, 4, 512))
    params = jax.eval_shape(mha.init, jax.random.key(0), x, x)
    got = views(params, rank=64)
    assert got["params/query/kernel"] == "512×(8·64)"
    assert got["params/out/kernel"] == "(8·64)×512"
    assert got["params/query/bias"] is None and got["params/out/bias"] is None


def test_scanned_nnx_layers_are_stacks():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=rngs)
            self.mlp = nnx.Linear(32, 64, use_bias=False, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.layers = make(rngs)

    got = views(nnx.state(Model(nnx.Rngs(0)), nnx.Param), rank=8)
    assert got["layers/attn/query/kernel"] == "3 × 32×(4·8)"
    assert got["layers/attn/out/kernel"] == "3 × (4·8)×32"
    assert got["layers/mlp/kernel"] == "3 × 32×64"
    assert got["layers/attn/query/bias"] is None


def test_state_sharding_of_a_merged_axis():
    rule = fo._sharding.state_partition_spec
    view = default_view("attn/query/kernel", (512, 8, 64))
    # Heads tensor-parallel: the merged output axis heads·head_dim is sharded like heads.
    spec = P("fsdp", "tensor", None)
    assert rule((64, 512), (512, 8, 64), spec, view) == P(None, "tensor")  # right basis (k, n)
    assert rule((512, 64), (512, 8, 64), spec, view) == P("fsdp", None)  # right moments (m, k)
    assert rule((), (512, 8, 64), spec, view) == P()
    out = default_view("attn/out/kernel", (8, 64, 512))
    assert rule((512, 64), (8, 64, 512), P("tensor", "x", None), out) == P(("tensor", "x"), None)


def test_describe_projection_shows_the_matrix_view():
    params = {"attn": {"query": {"kernel": jnp.ones((512, 8, 64))}}}
    text = fo.describe_projection(params, fo.ProjectionSpec(64))
    assert "512×(8·64)" in text and "(0.19×)" in text


def test_projected_mask_labels_multi_transform():
    params = {"attn": {"query": {"kernel": jnp.ones((64, 4, 16))}}, "embed": jnp.ones((10, 64))}
    mask = fo.projected_mask(params, fo.ProjectionSpec(rank=8))
    assert mask == {"attn": {"query": {"kernel": True}}, "embed": False}
    regex = fo.projected_mask(params, fo.ProjectionSpec(None, projected="query"))
    np.testing.assert_equal(regex, {"attn": {"query": {"kernel": True}}, "embed": False})
