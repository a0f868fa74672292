"""AutoencoderKL (the SD VAE), parameter tree as diffusers' `FlaxAutoencoderKL`.

`encode` returns the posterior (mean, logvar) and `decode` the image; the 0.18215 latent scaling and the posterior
sampling are the caller's, so that sampling and training inject their own noise.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.attention import multi_head_attention
from pasd_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from pasd_jax.models.config import VAEConfig
from pasd_jax.models.layers import Conv, Dense, GroupNorm
from pasd_jax.models.unet import nchw_to_nhwc, nhwc_to_nchw

VAE_EPS = 1e-6


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels with a residual (the VAE mid block)."""
    channels: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        r = x
        t = GroupNorm(self.groups, VAE_EPS, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q = Dense(c, name="query", **kw)(t)
        k = Dense(c, name="key", **kw)(t)
        v = Dense(c, name="value", **kw)(t)
        out = multi_head_attention(q, k, v, 1, name="/".join(self.scope.path))
        out = Dense(c, name="proj_attn", **kw)(out).reshape(b, h, w, c)
        return out + r


class VAEMidBlock(nn.Module):
    channels: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, VAE_EPS, name="resnets_0", **kw)(x, None)
        x = VAEAttention(self.channels, self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.groups, VAE_EPS, name="resnets_1", **kw)(x, None)


class ResnetStack(nn.Module):
    """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets without time embedding, then an optional resampler."""
    channels: int
    num_layers: int
    groups: int
    resample: str | None = None  # "down" (right/bottom pad + stride-2 conv), "up" (nearest x2 + conv) or None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, VAE_EPS, name=f"resnets_{i}", **kw)(x, None)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = cfg.block_out_channels
        x = Conv(ch[0], name="conv_in", **kw)(x)
        for i, c in enumerate(ch):
            x = ResnetStack(c, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < len(ch) - 1 else None,
                            name=f"down_blocks_{i}", **kw)(x)
        x = VAEMidBlock(ch[-1], cfg.norm_num_groups, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out", **kw)(x))
        return Conv(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = tuple(reversed(cfg.block_out_channels))
        x = Conv(ch[0], name="conv_in", **kw)(z)
        x = VAEMidBlock(ch[0], cfg.norm_num_groups, name="mid_block", **kw)(x)
        for i, c in enumerate(ch):
            x = ResnetStack(c, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < len(ch) - 1 else None,
                            name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out", **kw)(x))
        return Conv(cfg.out_channels, name="conv_out", dtype=jnp.float32, param_dtype=self.param_dtype)(
            x.astype(jnp.float32))


class AutoencoderKL(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, kernel_size=1, padding=0, dtype=jnp.float32,
                                   param_dtype=self.param_dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, kernel_size=1, padding=0, **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """NCHW RGB in [-1, 1] -> posterior (mean, logvar), NCHW fp32; logvar clamped to [-30, 20]."""
        h = self.encoder(nchw_to_nhwc(images).astype(self.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h.astype(jnp.float32))
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return nhwc_to_nchw(mean), nhwc_to_nchw(jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """NCHW unscaled latents -> NCHW images, about [-1, 1], fp32, unclamped."""
        z = nchw_to_nhwc(latents).astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return nhwc_to_nchw(self.decoder(z))

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)

    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> tuple:
        s = size or 2 ** (len(self.config.block_out_channels) - 1)
        return (jnp.zeros((batch, self.config.in_channels, s, s), jnp.float32),)


def sample_posterior(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """z = mean + std * noise, with the caller's noise (so recorded draws can be replayed)."""
    return mean + jnp.exp(0.5 * logvar) * noise
