"""The PASD ControlNet: SD encoder trunk, zero convs, and the degradation-removal (DR) pyramid.

The DR pyramid turns the upsampled LQ image (RGB in [0, 1]) into the conditioning embedding and, at each stride-2
stage, a side RGB image (`to_rgbs`) that training pulls towards the downsampled HQ image. The same scaled zero-conv
outputs are the UNet's skip residuals and its PACA contexts.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.config import ControlNetConfig
from pasd_jax.models.layers import Conv
from pasd_jax.models.unet import encoder_path, mid_block, nchw_to_nhwc, nhwc_to_nchw, time_embedding


class ResidualDenseBlock(nn.Module):
    """ESRGAN dense block: five 3x3 convs over the running channel concat, 0.2-scaled residual."""
    features: int
    growth: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init="rrdb")
        feats = [x]
        for i in range(1, 5):
            h = Conv(self.growth, name=f"conv{i}", **kw)(jnp.concatenate(feats, axis=-1))
            feats.append(nn.leaky_relu(h, 0.2))
        out = Conv(self.features, name="conv5", **kw)(jnp.concatenate(feats, axis=-1))
        return out * 0.2 + x


class RRDB(nn.Module):
    features: int
    growth: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x
        for i in (1, 2, 3):
            h = ResidualDenseBlock(self.features, self.growth, name=f"rdb{i}", **kw)(h)
        return h * 0.2 + x


class DegradationRemovalPyramid(nn.Module):
    """`controlnet_cond_embedding`: returns (embedding, side RGB outputs at 1/2, 1/4, 1/8 ...)."""
    out_channels: int
    block_channels: tuple[int, ...] = (16, 32, 96, 256)
    use_rrdb: bool = False
    rgb_heads: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cond: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.block_channels
        x = nn.silu(Conv(ch[0], name="conv_in", **kw)(cond))
        if self.use_rrdb:
            for i in range(2):
                x = RRDB(ch[0], ch[0], name=f"preprocesser_{i}", **kw)(x)
        rgbs = []
        for i in range(len(ch) - 1):
            x = nn.silu(Conv(ch[i], name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(Conv(ch[i + 1], stride=2, name=f"blocks_{2 * i + 1}", **kw)(x))
            if self.rgb_heads:
                rgbs.append(Conv(3, name=f"to_rgbs_{i}", **kw)(x))
        emb = Conv(self.out_channels, name="conv_out", init="zeros", **kw)(x)
        return emb, tuple(rgbs)


class PASDControlNet(nn.Module):
    config: ControlNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: float | jax.Array = 1.0):
        """NCHW latents + NCHW RGB condition in [0, 1] -> (rgbs, down_block_res_samples, mid_block_res_sample),
        all NCHW; the residuals are multiplied by `conditioning_scale`, the rgbs are not. `sample` and
        `controlnet_cond` may be at the image batch B with `encoder_hidden_states` at k*B (`models.shared_batch`):
        the outputs computed before the first text layer then stay at B."""
        ccfg = self.config
        cfg = ccfg.unet
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nchw_to_nhwc(sample).astype(self.dtype)
        cond = nchw_to_nhwc(controlnet_cond).astype(self.dtype)
        if ccfg.channel_order == "bgr":
            cond = cond[..., ::-1]
        context = encoder_hidden_states.astype(self.dtype)
        temb = time_embedding(cfg, timesteps, x.shape[0], **kw)
        x = Conv(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        emb, rgbs = DegradationRemovalPyramid(cfg.block_out_channels[0], ccfg.conditioning_embedding_out_channels,
                                              ccfg.use_rrdb, ccfg.rgb_heads, name="controlnet_cond_embedding",
                                              **kw)(cond)
        x = x + emb
        x, skips = encoder_path(cfg, x, temb, context, remat=self.remat, **kw)
        x = mid_block(cfg, x, temb, context, remat=self.remat, **kw)
        scale = jnp.asarray(conditioning_scale, self.dtype)
        down = tuple(
            nhwc_to_nchw(Conv(s.shape[-1], kernel_size=1, padding=0, init="zeros",
                              name=f"controlnet_down_blocks_{k}", **kw)(s) * scale)
            for k, s in enumerate(skips))
        mid = Conv(x.shape[-1], kernel_size=1, padding=0, init="zeros", name="controlnet_mid_block", **kw)(x)
        return tuple(nhwc_to_nchw(r) for r in rgbs), down, nhwc_to_nchw(mid * scale)

    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> tuple:
        cfg = self.config.unet
        s = size or 2 ** (len(cfg.down_block_types) - 1)
        return (jnp.zeros((batch, cfg.in_channels, s, s), jnp.float32), jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, 77, cfg.cross_attention_dim), jnp.float32),
                jnp.zeros((batch, self.config.conditioning_channels, 8 * s, 8 * s), jnp.float32))


SHARED_WITH_UNET = ("conv_in", "time_embedding", "down_blocks_", "mid_block")


def controlnet_params_from_unet(unet_params: dict, controlnet_params: dict) -> dict:
    """Copy the UNet's encoder (conv_in, time embedding, down and mid blocks) into fresh ControlNet params, as
    PASD training initialises its ControlNet; the zero convs and the DR pyramid keep their own init."""
    out = dict(controlnet_params)
    for name, sub in controlnet_params.items():
        if name.startswith(SHARED_WITH_UNET) and not name.startswith("controlnet_"):
            src = unet_params[name]
            if jax.tree_util.tree_structure(src) != jax.tree_util.tree_structure(sub):
                raise ValueError(f"UNet and ControlNet disagree on the structure of {name}")
            out[name] = jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, b.dtype), src, sub)
    return out
