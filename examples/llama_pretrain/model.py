"""A LLaMA-style decoder-only transformer in Flax NNX.

Architecture (as in LLaMA / the GaLore and Fira pre-training code):

* token embedding ``embed`` (no positional embedding table),
* ``num_layers`` pre-norm blocks: ``attn_norm`` (RMSNorm) -> causal multi-head
  self-attention with rotary position embeddings (``attn/q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj``), residual; ``mlp_norm`` (RMSNorm) -> SwiGLU MLP
  (``mlp/gate_proj``, ``up_proj``, ``down_proj``), residual,
* final RMSNorm ``norm`` and an **untied** output head ``lm_head`` (its own matrix, not
  the transposed embedding, as in LLaMA),
* no biases anywhere.

Parameter names are chosen so that the default rule of ``fira_optax`` (project the
>=2-D leaves whose path does not contain ``embed``/``lm_head``/``head``/``norm``) picks
exactly the seven attention and MLP kernels per layer, the same set the GaLore and Fira
papers project; ``embed``, ``lm_head`` and the norm scales get plain Adam(W).

With ``scan_layers=True`` the blocks are created with ``nnx.vmap`` and applied with
``nnx.scan``, so each kernel is a single ``(num_layers, m, n)`` leaf (faster compiles for
deep models); the library projects each of the ``num_layers`` matrices separately.

Shape suffixes follow the nanodo convention: ``x_BxLxD`` is (batch, length, d_model);
``H`` heads, ``K`` head dim, ``F`` FFN width, ``V`` vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from examples.llama_pretrain.configs import Config

_init = nnx.initializers.normal(stddev=0.02)


def _dense(cfg: Config, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        kernel_init=_init,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned per-feature ``scale``."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(self.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Returns (sin, cos), each (L, K/2), for rotary position embeddings."""
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_LxK2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
    return jnp.sin(angles_LxK2), jnp.cos(angles_LxK2)


def apply_rope(x_BxLxHxK: jax.Array, sin_LxK2: jax.Array, cos_LxK2: jax.Array) -> jax.Array:
    """Rotates feature pairs (first half, second half) as in the HF LLaMA implementation."""
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_LxK2[None, :, None, :], cos_LxK2[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention with rotary embeddings, no biases."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"d_model={cfg.d_model} not divisible by num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.q_proj = _dense(cfg, cfg.d_model, cfg.d_model, rngs)
        self.k_proj = _dense(cfg, cfg.d_model, cfg.d_model, rngs)
        self.v_proj = _dense(cfg, cfg.d_model, cfg.d_model, rngs)
        self.o_proj = _dense(cfg, cfg.d_model, cfg.d_model, rngs)

    def __call__(self, x_BxLxD: jax.Array, sin_LxK2: jax.Array, cos_LxK2: jax.Array):
        B, L, D = x_BxLxD.shape
        H, K = self.num_heads, self.head_dim
        q_BxLxHxK = apply_rope(self.q_proj(x_BxLxD).reshape(B, L, H, K), sin_LxK2, cos_LxK2)
        k_BxLxHxK = apply_rope(self.k_proj(x_BxLxD).reshape(B, L, H, K), sin_LxK2, cos_LxK2)
        v_BxLxHxK = self.v_proj(x_BxLxD).reshape(B, L, H, K)
        out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True)
        return self.o_proj(out_BxLxHxK.reshape(B, L, D))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.gate_proj = _dense(cfg, cfg.d_model, cfg.ffn_dim, rngs)
        self.up_proj = _dense(cfg, cfg.d_model, cfg.ffn_dim, rngs)
        self.down_proj = _dense(cfg, cfg.ffn_dim, cfg.d_model, rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.silu(self.gate_proj(x_BxLxD)) * self.up_proj(x_BxLxD)
        return self.down_proj(h_BxLxF)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.dtype)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxLxD: jax.Array, sin_LxK2: jax.Array, cos_LxK2: jax.Array):
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), sin_LxK2, cos_LxK2)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


class Llama(nnx.Module):
    """LLaMA-style causal language model; ``__call__`` maps token ids (B, L) to logits."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=_init,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs)

            self.layers = make_blocks(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.dtype)
        self.lm_head = _dense(cfg, cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        L = tokens_BxL.shape[1]
        sin_LxK2, cos_LxK2 = rope_tables(
            L, self.cfg.d_model // self.cfg.num_heads, self.cfg.rope_theta
        )
        x_BxLxD = self.embed(tokens_BxL)
        if self.cfg.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run_blocks(x_BxLxD: jax.Array, block: Block) -> jax.Array:
                return block(x_BxLxD, sin_LxK2, cos_LxK2)

            x_BxLxD = run_blocks(x_BxLxD, self.layers)
        else:
            for block in self.layers:
                x_BxLxD = block(x_BxLxD, sin_LxK2, cos_LxK2)
        logits_BxLxV = self.lm_head(self.norm(x_BxLxD))
        return logits_BxLxV.astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
