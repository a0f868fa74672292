"""Tiled VAE encode/decode that bounds memory by tiles but keeps the untiled result (exact GroupNorm, global
attention).

Why: the SD VAE's full-resolution activations dominate sampling memory. A 4096x4096 decode holds 4096^2 x 256
channels (8.6 GB in bf16) after the last upsampler; an untiled XLA program keeps several such tensors plus the
normalised/activated copies and the conv inputs alive at once. Tiling bounds the working set of each layer.

How (layer-synchronous tiling): every full-resolution activation is kept whole (it is what exact GroupNorm needs),
but every local computation between two GroupNorms (GroupNorm apply -> SiLU -> 3x3 conv [-> shortcut + residual],
downsample, nearest-upsample -> conv) runs tile by tile in a `lax.fori_loop`: each tile reads its window of the
input with exactly the halo the convolution needs (1 px, the stride-2 window of the downsampler, half a pixel-row
pair for the upsampler), positions outside the image are zeroed after the pointwise ops (= the conv's zero
padding), and the tile's output is written into the full output with `dynamic_update_slice` (in place). So:

- GroupNorm statistics are exact: two-pass fp32 mean/variance over the whole image (the official tiled VAE pools
  per-tile statistics, which ignores the variance between tile means).
- The mid-block self-attention runs untiled on the whole latent-resolution activation (global, exact; the official
  runs it per tile). It is cheap: 512x512 latents (a 4096^2 image) are 262k tokens, and the attention dispatch
  computes large score matrices in query chunks on the GPU (1024 x 262k fp32 = 1 GB per chunk).
- Convolutions see exact halos, so tile borders are invisible: the result equals the untiled VAE up to float
  rounding (summation order), which the tests check on the tiny VAE.

Memory: at most about four full activations of the current level live at once (the block input kept for the
shortcut, the zero-padded conv input, the hidden tensor, the block output), plus one tile's working set (for the
default decoder tile, a 1794^2 x 256 bf16 window and its 1792^2 conv output, about 2.4 GB at the top level). For
a 4096^2 bf16 decode the worst point is the first 128-channel resnet: its 256-channel input (8.6 GB) and padded
copy (8.6 GB) plus the 4.3 GB hidden tensor, about 24 GB with the tile; the encoder of a 4096^2 image peaks near
15 GB (128 channels at full resolution). A 2048^2 decode needs a quarter, about 6 GB. Untiled, XLA would also keep
whole-image normalised, activated and upsampled copies per layer (a 4096^2 x 256 upsample alone is 8.6 GB more).
With the bf16 weights (about 3 GB: PASD UNet, ControlNet, VAE, text encoder) a 2048^2 output thus fits a 16 GB GPU and
a 4096^2 output 80 GB.

Tile sizes follow the official options: `encoder_tile` in image pixels, `decoder_tile` in latent pixels, scaled
with each level's resolution; the last tile of each axis is pinned to the edge (overlapping tiles recompute the
same exact values). The "auto" switch uses the official thresholds (encoder tiles above max(H, W) > tile + 64,
decoder above max(h, w) > tile + 22); since the result does not depend on tiling, the thresholds only trade speed
for memory.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.models.layers import Conv
from pasd_jax.models.unet import nchw_to_nhwc, nhwc_to_nchw
from pasd_jax.models.vae import VAE_EPS, AutoencoderKL, VAEMidBlock

F32 = jnp.float32
ENCODER_PAD = 32    # official pads: tiling only starts above tile + 2 * pad
DECODER_PAD = 11


@dataclasses.dataclass(frozen=True)
class VAETiling:
    """Static tiling of one VAE call. `None` means untiled."""
    encoder_tile: int | None = None   # image pixels
    decoder_tile: int | None = None   # latent pixels


def resolve_vae_tiling(mode: str, height: int, width: int, encoder_tile: int, decoder_tile: int,
                       factor: int = 8) -> VAETiling:
    """Which VAE passes to tile for an image of (height, width) pixels: mode "auto" (official thresholds), "on",
    or "off"."""
    if mode == "off":
        return VAETiling()
    if mode == "on":
        return VAETiling(encoder_tile, decoder_tile)
    if mode != "auto":
        raise ValueError(f"tiled_vae must be 'auto', 'on' or 'off', got {mode!r}")
    big = max(height, width)
    enc = encoder_tile if big > encoder_tile + 2 * ENCODER_PAD else None
    dec = decoder_tile if big // factor > decoder_tile + 2 * DECODER_PAD else None
    return VAETiling(enc, dec)


# ---------------------------------------------------------------------------------------------------------------
# Tiled map over output tiles


def _starts(length: int, tile: int) -> list[int]:
    """Non-overlapping tile starts, the last one pinned to length - tile."""
    if tile >= length:
        return [0]
    n = math.ceil(length / tile)
    return [k * tile for k in range(n - 1)] + [length - tile]


@dataclasses.dataclass(frozen=True)
class _Input:
    """One input of a tiled op: the array (already padded by `lo` before and enough after), how its coordinates
    relate to the output's (in = out * num / den) and how many extra rows/cols the window needs."""
    array: jax.Array
    num: int
    den: int
    lo: int
    hi: int


def _tiled(fn: Callable[..., jax.Array], inputs: Sequence[_Input], out_hw: tuple[int, int], out_channels: int,
           out_dtype: Any, tile: int, even: bool = False) -> jax.Array:
    """Run `fn(oy, ox, *windows) -> [B, th, tw, C]` over output tiles and assemble the [B, H, W, C] result.

    The window of input i for the output tile at (oy, ox) of size (th, tw) starts at (oy * num / den, ...) in the
    padded input and spans th * num / den + lo + hi rows (likewise columns).
    """
    ho, wo = out_hw
    b = inputs[0].array.shape[0]
    th, tw = min(tile, ho), min(tile, wo)
    if even and (th % 2 or tw % 2):
        raise ValueError(f"tile {th}x{tw} must be even here")
    origins = [(y, x) for y in _starts(ho, th) for x in _starts(wo, tw)]

    def windows(oy, ox):
        out = []
        for inp in inputs:
            iy, ix = oy * inp.num // inp.den, ox * inp.num // inp.den
            size = (b, th * inp.num // inp.den + inp.lo + inp.hi, tw * inp.num // inp.den + inp.lo + inp.hi,
                    inp.array.shape[-1])
            out.append(jax.lax.dynamic_slice(inp.array, (0, iy, ix, 0), size))
        return out

    if len(origins) == 1:
        return fn(0, 0, *windows(0, 0)).astype(out_dtype)
    table = jnp.asarray(np.asarray(origins, np.int32))

    def body(k, out):
        oy, ox = table[k, 0], table[k, 1]
        y = fn(oy, ox, *windows(oy, ox)).astype(out_dtype)
        return jax.lax.dynamic_update_slice(out, y, (0, oy, ox, 0))
    return jax.lax.fori_loop(0, len(origins), body, jnp.zeros((b, ho, wo, out_channels), out_dtype))


def _pad(x: jax.Array, lo: int, hi: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))


def _inside(oy, ox, shape: tuple[int, int], win: tuple[int, int], halo: int) -> jax.Array:
    """[1, wh, ww, 1] mask of the window positions inside an image of `shape` (window starts at origin - halo)."""
    rows = oy - halo + jnp.arange(win[0])
    cols = ox - halo + jnp.arange(win[1])
    ok = ((rows >= 0) & (rows < shape[0]))[:, None] & ((cols >= 0) & (cols < shape[1]))[None, :]
    return ok[None, :, :, None]


# ---------------------------------------------------------------------------------------------------------------
# Exact GroupNorm split into global statistics and a per-tile apply (same formula as layers.GroupNorm)


def group_stats(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """Two-pass fp32 mean and variance per (sample, group) over the whole image: [B, 1, G, 1] each."""
    b, _, _, c = x.shape
    xg = x.astype(F32).reshape(b, -1, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    return mean, var


def group_apply(x: jax.Array, stats: tuple[jax.Array, jax.Array], norm: dict, groups: int, dtype: Any) -> jax.Array:
    mean, var = stats
    shape = x.shape
    xg = x.astype(F32).reshape(shape[0], -1, groups, shape[-1] // groups)
    y = ((xg - mean) * jax.lax.rsqrt(var + VAE_EPS)).reshape(shape)
    return (y * norm["scale"].astype(F32) + norm["bias"].astype(F32)).astype(dtype)


def _conv(p: dict, x: jax.Array, dtype: Any, stride: int = 1) -> jax.Array:
    """VALID conv with the model's Conv layer (so dtype handling is the model's)."""
    k = p["kernel"].shape[0]
    return Conv(p["kernel"].shape[-1], kernel_size=k, stride=stride, padding=0, dtype=dtype).apply({"params": p}, x)


# ---------------------------------------------------------------------------------------------------------------
# Tiled layers


class _Ctx:
    def __init__(self, groups: int, dtype: Any):
        self.groups, self.dtype = groups, dtype


def tiled_conv3x3(p: dict, x: jax.Array, ctx: _Ctx, tile: int, out_dtype: Any | None = None) -> jax.Array:
    """3x3 conv, padding 1, on a raw input (zero padding is exact without a mask)."""
    h, w = x.shape[1:3]
    out_dtype = out_dtype or ctx.dtype
    return _tiled(lambda oy, ox, xt: _conv(p, xt, ctx.dtype), [_Input(_pad(x, 1, 1), 1, 1, 1, 1)], (h, w),
                  p["kernel"].shape[-1], out_dtype, tile)


def _norm_act_conv(p_norm: dict, p_conv: dict, stats, ctx: _Ctx, oy, ox, xt, shape, out_f32: bool = False):
    """GroupNorm apply -> SiLU -> zero outside the image -> VALID 3x3 conv on one window."""
    a = jax.nn.silu(group_apply(xt, stats, p_norm, ctx.groups, ctx.dtype))
    a = jnp.where(_inside(oy, ox, shape, xt.shape[1:3], 1), a, jnp.zeros((), a.dtype))
    if out_f32:
        return _conv(p_conv, a.astype(F32), F32)
    return _conv(p_conv, a, ctx.dtype)


def tiled_resnet(p: dict, x: jax.Array, ctx: _Ctx, tile: int) -> jax.Array:
    """VAE ResnetBlock2D (no time embedding): two tiled passes with exact global GroupNorm statistics."""
    h, w = x.shape[1:3]
    cout = p["conv1"]["kernel"].shape[-1]
    s1 = group_stats(x, ctx.groups)
    hid = _tiled(lambda oy, ox, xt: _norm_act_conv(p["norm1"], p["conv1"], s1, ctx, oy, ox, xt, (h, w)),
                 [_Input(_pad(x, 1, 1), 1, 1, 1, 1)], (h, w), cout, ctx.dtype, tile)
    s2 = group_stats(hid, ctx.groups)

    def second(oy, ox, ht, xt):
        out = _norm_act_conv(p["norm2"], p["conv2"], s2, ctx, oy, ox, ht, (h, w))
        if "conv_shortcut" in p:
            xt = _conv(p["conv_shortcut"], xt, ctx.dtype)
        return xt.astype(ctx.dtype) + out
    return _tiled(second, [_Input(_pad(hid, 1, 1), 1, 1, 1, 1), _Input(x, 1, 1, 0, 0)], (h, w), cout, ctx.dtype,
                  tile)


def tiled_downsample(p: dict, x: jax.Array, ctx: _Ctx, tile: int) -> jax.Array:
    """The VAE downsampler: pad right/bottom by one, 3x3 conv with stride 2 and no padding."""
    h, w = x.shape[1:3]
    out_hw = ((h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1)
    return _tiled(lambda oy, ox, xt: _conv(p["conv"], xt, ctx.dtype, stride=2),
                  [_Input(_pad(x, 0, 1), 2, 1, 0, 1)], out_hw, p["conv"]["kernel"].shape[-1], ctx.dtype, tile)


def tiled_upsample(p: dict, x: jax.Array, ctx: _Ctx, tile: int) -> jax.Array:
    """Nearest x2 upsample then 3x3 conv (padding 1): each output tile reads its input window with a 1-px halo,
    upsamples it and drops the outer row/column (the zero-padded input rows give the conv's zero padding)."""
    h, w = x.shape[1:3]

    def fn(oy, ox, xt):
        up = jnp.repeat(jnp.repeat(xt, 2, axis=1), 2, axis=2)[:, 1:-1, 1:-1]
        return _conv(p["conv"], up, ctx.dtype)
    return _tiled(fn, [_Input(_pad(x, 1, 1), 1, 2, 1, 1)], (2 * h, 2 * w), p["conv"]["kernel"].shape[-1],
                  ctx.dtype, tile, even=True)


def _norm_out_conv(p_norm: dict, p_conv: dict, x: jax.Array, ctx: _Ctx, tile: int, out_f32: bool) -> jax.Array:
    """conv_norm_out -> SiLU -> conv_out, tiled."""
    h, w = x.shape[1:3]
    stats = group_stats(x, ctx.groups)
    return _tiled(lambda oy, ox, xt: _norm_act_conv(p_norm, p_conv, stats, ctx, oy, ox, xt, (h, w), out_f32),
                  [_Input(_pad(x, 1, 1), 1, 1, 1, 1)], (h, w), p_conv["kernel"].shape[-1],
                  F32 if out_f32 else ctx.dtype, tile)


def _mid_block(vae: AutoencoderKL, p: dict, x: jax.Array, channels: int) -> jax.Array:
    """The mid block (resnet, global self-attention, resnet) untiled: it runs at latent resolution."""
    return VAEMidBlock(channels, vae.config.norm_num_groups, dtype=vae.dtype).apply({"params": p}, x)


# ---------------------------------------------------------------------------------------------------------------
# Encoder / decoder


def tiled_encoder(vae: AutoencoderKL, params: dict, images: jax.Array, tile: int) -> jax.Array:
    """`vae.encoder` on NHWC images with image-pixel tile `tile` (scaled down with each level)."""
    cfg, p = vae.config, params["encoder"]
    ctx = _Ctx(cfg.norm_num_groups, vae.dtype)
    x = tiled_conv3x3(p["conv_in"], images.astype(vae.dtype), ctx, tile)
    level_tile = tile
    n = len(cfg.block_out_channels)
    for i in range(n):
        blk = p[f"down_blocks_{i}"]
        for j in range(cfg.layers_per_block):
            x = tiled_resnet(blk[f"resnets_{j}"], x, ctx, level_tile)
        if i < n - 1:
            level_tile = max(level_tile // 2, 1)
            x = tiled_downsample(blk["downsamplers_0"], x, ctx, level_tile)
    x = _mid_block(vae, p["mid_block"], x, cfg.block_out_channels[-1])
    return _norm_out_conv(p["conv_norm_out"], p["conv_out"], x, ctx, level_tile, out_f32=False)


def tiled_decoder(vae: AutoencoderKL, params: dict, z: jax.Array, tile: int) -> jax.Array:
    """`vae.decoder` on NHWC latents (after post_quant_conv) with latent-pixel tile `tile` (scaled up per level)."""
    cfg, p = vae.config, params["decoder"]
    ctx = _Ctx(cfg.norm_num_groups, vae.dtype)
    ch = tuple(reversed(cfg.block_out_channels))
    x = tiled_conv3x3(p["conv_in"], z.astype(vae.dtype), ctx, tile)
    x = _mid_block(vae, p["mid_block"], x, ch[0])
    level_tile = tile
    for i in range(len(ch)):
        blk = p[f"up_blocks_{i}"]
        for j in range(cfg.layers_per_block + 1):
            x = tiled_resnet(blk[f"resnets_{j}"], x, ctx, level_tile)
        if i < len(ch) - 1:
            level_tile *= 2
            x = tiled_upsample(blk["upsamplers_0"], x, ctx, level_tile)
    return _norm_out_conv(p["conv_norm_out"], p["conv_out"], x, ctx, level_tile, out_f32=True)


def encode(vae: AutoencoderKL, params: dict, images: jax.Array, tile: int | None) -> tuple[jax.Array, jax.Array]:
    """NCHW images in [-1, 1] -> posterior (mean, logvar), NCHW fp32; tiled when `tile` is set."""
    if tile is None:
        return vae.apply({"params": params}, images, method=vae.encode)
    cfg = vae.config
    h = tiled_encoder(vae, params, nchw_to_nhwc(images), tile)
    if cfg.use_quant_conv:
        h = _conv(params["quant_conv"], h.astype(F32), F32)
    mean, logvar = jnp.split(h.astype(F32), 2, axis=-1)
    return nhwc_to_nchw(mean), nhwc_to_nchw(jnp.clip(logvar, -30.0, 20.0))


def decode(vae: AutoencoderKL, params: dict, latents: jax.Array, tile: int | None) -> jax.Array:
    """NCHW unscaled latents -> NCHW images (fp32, unclamped); tiled when `tile` is set."""
    if tile is None:
        return vae.apply({"params": params}, latents, method=vae.decode)
    z = nchw_to_nhwc(latents).astype(vae.dtype)
    if vae.config.use_post_quant_conv:
        z = _conv(params["post_quant_conv"], z, vae.dtype)
    return nhwc_to_nchw(tiled_decoder(vae, params, z, tile))
