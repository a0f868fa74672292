"""The CLIP text tower SD1.5 conditions on (ViT-L/14 text encoder), parameter tree as transformers'
`FlaxCLIPTextModel`: `text_model/{embeddings, encoder/layers/<i>, final_layer_norm}`.

Only `last_hidden_state` is produced: SD uses all 77 positions, padding included, with the causal mask and no
attention mask.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.config import CLIPTextConfig
from pasd_jax.models.layers import Dense, Embed, LayerNorm


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, c = x.shape
        heads = cfg.num_attention_heads
        d = c // heads
        split = lambda t: t.reshape(b, n, heads, d)  # noqa: E731
        q = split(Dense(c, name="q_proj", **kw)(x))
        k = split(Dense(c, name="k_proj", **kw)(x))
        v = split(Dense(c, name="v_proj", **kw)(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
        causal = jnp.tril(jnp.ones((n, n), bool))
        logits = jnp.where(causal[None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c)
        return Dense(c, name="out_proj", **kw)(out)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(cfg, name="self_attn", **kw)(h)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = _MLP(cfg, name="mlp", **kw)(h)
        return x + h


class _MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _act(cfg.hidden_act)(Dense(cfg.intermediate_size, name="fc1", **kw)(x))
        return Dense(cfg.hidden_size, name="fc2", **kw)(h)


class _Layers(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, name=str(i), dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class _Encoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _Layers(self.config, name="layers", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tok = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype,
                    name="token_embedding")(input_ids)
        pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, param_dtype=self.param_dtype,
                    name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tok + pos[None]


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _Embeddings(cfg, name="embeddings", param_dtype=self.param_dtype)(input_ids).astype(self.dtype)
        x = _Encoder(cfg, name="encoder", **kw)(x)
        return LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)


class CLIPTextEncoder(nn.Module):
    """`apply({"params": p}, input_ids [B, L] int) -> last_hidden_state [B, L, hidden]`."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return _TextTransformer(self.config, name="text_model", dtype=self.dtype,
                                param_dtype=self.param_dtype)(jnp.asarray(input_ids, jnp.int32))

    def dummy_inputs(self, batch: int = 1) -> tuple:
        return (jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32),)
