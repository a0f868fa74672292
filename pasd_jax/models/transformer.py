"""The SD spatial transformer, shared by the text attention layers and PASD's pixel-aware cross-attention (PACA).

A PACA layer is this same module whose cross-attention context is a ControlNet feature map instead of text; the
`pasd_light` variant instead adds a second, pixel-wise cross-attention (`attn2_plus`) inside the text transformer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.attention import Attention
from pasd_jax.models.layers import Conv, Dense, GroupNorm, LayerNorm
from pasd_jax.models.shared_batch import common_batch, to_batch


class GEGLU(nn.Module):
    dim_out: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.dim_out * 2, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)  # exact GELU, as PyTorch's F.gelu


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
        return Dense(self.dim, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    only_cross_attention: bool = False
    pixel_attention: bool = False  # pasd_light: norm2_plus + attn2_plus over the pixel context
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, pixel_context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.dim, self.heads, name=name, **kw)  # noqa: E731
        h = LayerNorm(name="norm1", **kw)(x)
        if self.only_cross_attention:
            x, h, context = common_batch(x, h, context)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        x, context = common_batch(x, context)  # the first layer that reads the text
        h = LayerNorm(name="norm2", **kw)(x)
        x = x + attn("attn2")(h, context)
        if self.pixel_attention:
            x, pixel_context = common_batch(x, pixel_context)
            h = LayerNorm(name="norm2_plus", **kw)(x)
            x = x + attn("attn2_plus")(h, pixel_context)
        h = LayerNorm(name="norm3", **kw)(x)
        return x + FeedForward(self.dim, name="ff", **kw)(h)


class Transformer2D(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks -> proj_out, plus the input (NHWC in and out)."""
    channels: int
    heads: int
    depth: int = 1
    norm_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    pixel_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, pixel_context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        residual = x
        x = GroupNorm(self.norm_groups, epsilon=1e-6, name="norm", **kw)(x)
        proj = (lambda name, ch: Dense(ch, name=name, **kw)) if self.use_linear_projection else \
            (lambda name, ch: Conv(ch, kernel_size=1, padding=0, name=name, **kw))
        if self.use_linear_projection:
            x = proj("proj_in", c)(x.reshape(b, h * w, c))
        else:
            x = proj("proj_in", c)(x).reshape(b, h * w, c)
        if self.pixel_attention:
            cs = pixel_context.shape[-1]
            if self.use_linear_projection:
                pixel_context = proj("proj_in_plus", cs)(pixel_context.reshape(pixel_context.shape[0], -1, cs))
            else:
                pixel_context = proj("proj_in_plus", cs)(pixel_context).reshape(pixel_context.shape[0], -1, cs)
        for i in range(self.depth):
            x = BasicTransformerBlock(self.channels, self.heads, self.only_cross_attention, self.pixel_attention,
                                      name=f"transformer_blocks_{i}", **kw)(x, context, pixel_context)
        if self.use_linear_projection:
            x = proj("proj_out", c)(x).reshape(-1, h, w, c)
        else:
            x = proj("proj_out", c)(x.reshape(-1, h, w, c))
        return x + to_batch(residual, x.shape[0])


def flatten_context(feature_map: jax.Array) -> jax.Array:
    """NHWC map -> [B, H*W, C] tokens, row-major over (h, w) as PyTorch's b c h w -> b (h w) c."""
    b, h, w, c = feature_map.shape
    return feature_map.reshape(b, h * w, c)
