"""The SD UNet with PASD's pixel-aware cross-attention (PACA), for any diffusers UNet config.

`variant` selects the decoder: "pasd" (12 `pixel_attentions` transformers at SD1.5 size), "pasd_light"
(`attn2_plus` inside the text transformers of the cross-attention up blocks) or "sd" (the plain SD UNet, used for
base weights). The parameter tree of the SD part is identical to diffusers' `FlaxUNet2DConditionModel`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.blocks import (PASD, PLAIN, VARIANTS, DownBlock, MidBlock, TimestepEmbedding, UpBlock,
                                    broadcast_timesteps, timestep_embedding)
from pasd_jax.models.config import UNetConfig
from pasd_jax.models.layers import Conv, GroupNorm
from pasd_jax.models.shared_batch import common_batch


def nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def encoder_path(cfg: UNetConfig, x: jax.Array, temb: jax.Array, context: jax.Array, *, dtype, param_dtype,
                 remat: bool) -> tuple[jax.Array, list[jax.Array]]:
    """Down blocks of a UNet or ControlNet (called inside a compact module); returns (h, skips incl. h0)."""
    block_cls = nn.remat(DownBlock) if remat else DownBlock
    skips = [x]
    n = len(cfg.down_block_types)
    for i, kind in enumerate(cfg.down_block_types):
        x, s = block_cls(cfg.block_out_channels[i], cfg.layers_per_block[i], kind == "CrossAttnDownBlock2D",
                         i < n - 1, heads=cfg.heads[i], transformer_depth=cfg.transformer_layers_per_block[i],
                         groups=cfg.norm_num_groups, eps=cfg.norm_eps, downsample_padding=cfg.downsample_padding,
                         use_linear_projection=cfg.use_linear_projection,
                         only_cross_attention=cfg.only_cross_attention[i], dtype=dtype, param_dtype=param_dtype,
                         name=f"down_blocks_{i}")(x, temb, context)
        skips.extend(s)
    return x, skips


def mid_block(cfg: UNetConfig, x, temb, context, *, dtype, param_dtype, remat: bool) -> jax.Array:
    block_cls = nn.remat(MidBlock) if remat else MidBlock
    return block_cls(cfg.block_out_channels[-1], cfg.heads[-1],
                     transformer_depth=cfg.transformer_layers_per_block[-1], groups=cfg.norm_num_groups,
                     eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection, dtype=dtype,
                     param_dtype=param_dtype, name="mid_block")(x, temb, context)


def time_embedding(cfg: UNetConfig, timesteps, batch: int, *, dtype, param_dtype) -> jax.Array:
    t = broadcast_timesteps(timesteps, batch)
    emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    return TimestepEmbedding(cfg.block_out_channels[0] * 4, dtype=dtype, param_dtype=param_dtype,
                             name="time_embedding")(emb.astype(dtype))


class PASDUNet(nn.Module):
    config: UNetConfig
    variant: str = PASD
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
        """NCHW latents -> NCHW noise prediction. The ControlNet residuals (NCHW) are both added to the skips and,
        for the PASD variants, the PACA contexts. `sample` (and residuals computed from it) may be at the image
        batch B with `encoder_hidden_states` at k*B: the layers before the text run once per image
        (`models.shared_batch`)."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown UNet variant {self.variant!r}; expected one of {VARIANTS}")
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nchw_to_nhwc(sample).astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        temb = time_embedding(cfg, timesteps, x.shape[0], **kw)
        x = Conv(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        x, skips = encoder_path(cfg, x, temb, context, remat=self.remat, **kw)

        residuals = None
        if down_block_additional_residuals is not None:
            residuals = [nchw_to_nhwc(r).astype(self.dtype) for r in down_block_additional_residuals]
            if len(residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} ControlNet residuals, got {len(residuals)}")
            skips = [s + r for s, r in (common_batch(s, r) for s, r in zip(skips, residuals))]
        elif self.variant != PLAIN:
            if not self.is_initializing():
                raise ValueError(f"the {self.variant} UNet needs the ControlNet residuals "
                                 "(down_block_additional_residuals): its PACA layers attend to them")
            residuals = [jnp.zeros_like(s) for s in skips]

        x = mid_block(cfg, x, temb, context, remat=self.remat, **kw)
        if mid_block_additional_residual is not None:
            x, mid = common_batch(x, nchw_to_nhwc(mid_block_additional_residual).astype(self.dtype))
            x = x + mid

        up_cls = nn.remat(UpBlock) if self.remat else UpBlock
        n = len(cfg.up_block_types)
        rev = lambda t: tuple(reversed(t))  # noqa: E731
        channels, heads, layers = rev(cfg.block_out_channels), rev(cfg.heads), rev(cfg.layers_per_block)
        depths, only_cross = rev(cfg.transformer_layers_per_block), rev(cfg.only_cross_attention)
        for i, kind in enumerate(cfg.up_block_types):
            num = layers[i] + 1
            block_skips, skips = skips[-num:], skips[:-num]
            block_res = None
            if residuals is not None:
                block_res, residuals = residuals[-num:], residuals[:-num]
            add_up = i < n - 1
            size = tuple(skips[-1].shape[1:3]) if add_up else None
            x = up_cls(channels[i], num, kind == "CrossAttnUpBlock2D", add_up, upsample_size=size,
                       variant=self.variant, heads=heads[i], transformer_depth=depths[i],
                       groups=cfg.norm_num_groups, eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection,
                       only_cross_attention=only_cross[i], name=f"up_blocks_{i}", **kw)(
                           x, tuple(block_skips), temb, context, None if block_res is None else tuple(block_res))

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        # The last conv runs in fp32: its output is the noise estimate every sampler step integrates.
        x = Conv(cfg.out_channels, name="conv_out", dtype=jnp.float32, param_dtype=self.param_dtype)(
            x.astype(jnp.float32))
        return nhwc_to_nchw(x)

    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> tuple:
        cfg = self.config
        s = size or 2 ** (len(cfg.down_block_types) - 1)  # params do not depend on the spatial size
        return (jnp.zeros((batch, cfg.in_channels, s, s), jnp.float32), jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, 77, cfg.cross_attention_dim), jnp.float32))
