"""UNet building blocks (NHWC): time embedding, resnets, down/mid blocks and PASD's up blocks with PACA.

Up blocks take the ControlNet residuals in the same order as the skips: layer j of an up block pops the last skip
and the last residual, and its PACA attends to exactly that residual (spec section 2.3).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.layers import Conv, Dense, GroupNorm, resize_nearest
from pasd_jax.models.shared_batch import common_batch
from pasd_jax.models.transformer import Transformer2D, flatten_context

PASD = "pasd"
PASD_LIGHT = "pasd_light"
PLAIN = "sd"
VARIANTS = (PLAIN, PASD, PASD_LIGHT)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of [B] timesteps, computed in fp32 in PyTorch's operation order."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.dim, name="linear_1", **kw)(x)
        return Dense(self.dim, name="linear_2", **kw)(nn.silu(x))


def broadcast_timesteps(timesteps: jax.Array | float | int, batch: int) -> jax.Array:
    t = jnp.asarray(timesteps)
    if t.ndim == 0:
        t = t[None]
    return jnp.broadcast_to(t.astype(jnp.float32), (batch,))


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = Conv(self.out_channels, name="conv1", **kw)(h)
        if temb is not None:
            t = Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h, t = common_batch(h, t)  # temb is at the image batch; h may already be at the text batch
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = Conv(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, kernel_size=1, padding=0, name="conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:  # the VAE pads right/bottom only, then convolves unpadded
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv(self.channels, stride=2, padding=self.padding, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = resize_nearest(x, size)
        return Conv(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (with_attention) or `DownBlock2D`; returns (h, skips)."""
    out_channels: int
    num_layers: int
    with_attention: bool
    add_downsample: bool
    heads: int = 8
    transformer_depth: int = 1
    groups: int = 32
    eps: float = 1e-5
    downsample_padding: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.with_attention:
                x = Transformer2D(self.out_channels, self.heads, self.transformer_depth, self.groups,
                                  self.use_linear_projection, self.only_cross_attention,
                                  name=f"attentions_{i}", **kw)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer."""
    channels: int
    heads: int = 8
    num_layers: int = 1
    transformer_depth: int = 1
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, self.eps, name="resnets_0", **kw)(x, temb)
        for i in range(self.num_layers):
            x = Transformer2D(self.channels, self.heads, self.transformer_depth, self.groups,
                              self.use_linear_projection, name=f"attentions_{i}", **kw)(x, context)
            x = ResnetBlock2D(self.channels, self.groups, self.eps, name=f"resnets_{i + 1}", **kw)(x, temb)
        return x


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` (with_attention) or `UpBlock2D`, with PASD's pixel-aware layers per `variant`.

    pasd: a PACA transformer `pixel_attentions_j` after every layer, attending to the ControlNet residual paired
    with that layer's skip. pasd_light: the text transformers carry `attn2_plus` over the same residual (no
    PACA in blocks without text attention).
    """
    out_channels: int
    num_layers: int
    with_attention: bool
    add_upsample: bool
    upsample_size: tuple[int, int] | None = None
    variant: str = PLAIN
    heads: int = 8
    transformer_depth: int = 1
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, context, residuals: Sequence[jax.Array] | None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        light = self.variant == PASD_LIGHT and self.with_attention
        for j in range(self.num_layers):
            x, skip = common_batch(x, skips[-1 - j].astype(x.dtype))
            x = jnp.concatenate([x, skip], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{j}", **kw)(x, temb)
            residual = None if residuals is None else residuals[-1 - j].astype(x.dtype)
            if self.with_attention:
                x = Transformer2D(self.out_channels, self.heads, self.transformer_depth, self.groups,
                                  self.use_linear_projection, self.only_cross_attention, pixel_attention=light,
                                  name=f"attentions_{j}", **kw)(x, context, residual if light else None)
            if self.variant == PASD:
                x = Transformer2D(self.out_channels, self.heads, 1, self.groups, False, False,
                                  name=f"pixel_attentions_{j}", **kw)(x, flatten_context(residual))
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, self.upsample_size)
        return x
