"""Latent tiling of the denoiser with the official Gaussian blending (spec section 4.7).

The official pipeline tiles the UNet + ControlNet call when the latent area exceeds T^2 (T = latent_tiled_size,
320): square tiles of T' = min(T, h, w), stride T' - O, the last tile of each axis pinned to the edge, each tile's
output weighted by a separable Gaussian (sigma 0.1 T', centre (T'-1)/2 along x but T'/2 along y: a half-pixel
asymmetry of the official code, kept for parity) and the sum divided by the summed weights. The ControlNet image
crop is the latent crop times 8.

Here the layout is computed on the host (static ints), the tiles of all images are stacked tile-major (batch index
= tile * B + b) and cut into chunks of a fixed size, so one compiled model program of the fixed tile size serves
any image size. The blend weights, already divided by their per-pixel sum, are a host constant. This is the one
tiling implementation: `sampling.tiled` runs it, and the tests check it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PIXELS_PER_LATENT = 8


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Static tiling of an (height, width) latent into square tiles of side `tile`."""
    height: int
    width: int
    tile: int
    overlap: int
    offsets_y: tuple[int, ...]
    offsets_x: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.offsets_y) * len(self.offsets_x)

    @property
    def origins(self) -> tuple[tuple[int, int], ...]:
        """(y, x) of every tile, in the official order: x index outer ("rows"), y index inner ("cols")."""
        return tuple((oy, ox) for ox in self.offsets_x for oy in self.offsets_y)


def needs_tiling(height: int, width: int, tile_size: int = 320) -> bool:
    """The official switch compares areas: tile only when h * w > T^2."""
    return height * width > tile_size * tile_size


def tile_count(length: int, tile: int, overlap: int) -> int:
    """Smallest n with (n - 1) * (tile - overlap) + tile >= length."""
    if tile >= length:
        return 1
    return 1 + math.ceil((length - tile) / (tile - overlap))


def tile_offsets(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """k * (tile - overlap) for all but the last tile, which is pinned to length - tile."""
    n = tile_count(length, tile, overlap)
    return tuple(k * (tile - overlap) for k in range(n - 1)) + (length - tile,)


def tile_layout(height: int, width: int, tile_size: int = 320, overlap: int = 8) -> TileLayout:
    """The official layout for a latent of (height, width): T' = min(T, h, w), stride T' - O.

    Deviation: with T' <= O (a very thin image) the official loop never ends; here the overlap is capped at T' - 1.
    """
    if min(height, width, tile_size) < 1 or overlap < 0:
        raise ValueError(f"bad tiling request: {height}x{width}, tile {tile_size}, overlap {overlap}")
    tile = min(tile_size, height, width)
    overlap = min(overlap, tile - 1)
    return TileLayout(height=height, width=width, tile=tile, overlap=overlap,
                      offsets_y=tile_offsets(height, tile, overlap), offsets_x=tile_offsets(width, tile, overlap))


def gaussian_weights(tile: int) -> np.ndarray:
    """[tile, tile] (y, x) float64 blend weights of the official `_gaussian_weights` (variance 0.01 * T'^2).

    Centre (T'-1)/2 along x, T'/2 along y (official asymmetry). Includes the official 1/sqrt(2 pi var) factors,
    which cancel in the blend.
    """
    var = 0.01
    coords = np.arange(tile, dtype=np.float64)

    def probs(mid: float) -> np.ndarray:
        return np.exp(-(coords - mid) * (coords - mid) / (tile * tile) / (2 * var)) / np.sqrt(2 * np.pi * var)
    return np.outer(probs(tile / 2), probs((tile - 1) / 2))


def extract_tiles(x: jnp.ndarray, layout: TileLayout, scale: int = 1) -> jnp.ndarray:
    """Crops of an NCHW array at the layout's tiles (coordinates times `scale`), stacked tile-major:
    [B, C, H, W] -> [n_tiles * B, C, tile * scale, tile * scale]."""
    expect = (layout.height * scale, layout.width * scale)
    if tuple(x.shape[-2:]) != expect:
        raise ValueError(f"expected spatial size {expect} for this layout at scale {scale}, got {x.shape[-2:]}")
    s = layout.tile * scale
    crops = [x[..., oy * scale:oy * scale + s, ox * scale:ox * scale + s] for oy, ox in layout.origins]
    return jnp.concatenate(crops, axis=0)


def normalized_tile_weights(layout: TileLayout) -> np.ndarray:
    """[n_tiles, t, t] float32: each tile's Gaussian weight divided (in float64) by the summed weights at each
    pixel. Blending is then one weighted sum: pixels covered by one tile pass through exactly, and the official
    sum(w * out) / sum(w) is reproduced without its float32 division."""
    w = gaussian_weights(layout.tile)
    t = layout.tile
    denom = np.zeros((layout.height, layout.width), np.float64)
    for oy, ox in layout.origins:
        denom[oy:oy + t, ox:ox + t] += w
    return np.stack([w / denom[oy:oy + t, ox:ox + t] for oy, ox in layout.origins]).astype(np.float32)


def blend_tiles(tiles: jnp.ndarray, layout: TileLayout) -> jnp.ndarray:
    """Gaussian-weighted average of tile outputs [n_tiles * B, C, t, t] (tile-major) -> [B, C, H, W].

    Computed as ref + sum_k w_k (out_k - ref), with ref the output of one tile covering the pixel and w_k the
    normalised weights: the same average (the weights sum to one), but exact wherever the tiles agree, so a
    per-pixel model gives bit-identical noise estimates tiled and untiled instead of an error of |eps| times
    the float32 rounding of the weight sum.
    """
    n = layout.n_tiles
    if tiles.shape[0] % n:
        raise ValueError(f"{tiles.shape[0]} tile outputs is not a multiple of the {n} tiles of the layout")
    b = tiles.shape[0] // n
    t = layout.tile
    dtype = jnp.promote_types(tiles.dtype, jnp.float32)
    weights = jnp.asarray(normalized_tile_weights(layout), dtype)
    per_tile = tiles.astype(dtype).reshape((n, b) + tiles.shape[1:])
    ref = jnp.zeros((b,) + tiles.shape[1:-2] + (layout.height, layout.width), dtype)
    for k, (oy, ox) in enumerate(layout.origins):
        ref = ref.at[..., oy:oy + t, ox:ox + t].set(per_tile[k])
    out = ref
    for k, (oy, ox) in enumerate(layout.origins):
        out = out.at[..., oy:oy + t, ox:ox + t].add(weights[k] * (per_tile[k] - ref[..., oy:oy + t, ox:ox + t]))
    return out.astype(tiles.dtype)


def repeat_for_tiles(x: jnp.ndarray, n_tiles: int) -> jnp.ndarray:
    """Per-sample context [B, ...] -> [n_tiles * B, ...] in the tile-major order of `extract_tiles`."""
    return jnp.tile(x, (n_tiles,) + (1,) * (x.ndim - 1))


# The sampler's path: all tiles of all images in fixed-size chunks (one model program for every image size)

def to_chunks(tiles: jax.Array, chunk: int) -> tuple[jax.Array, ...]:
    """[n, ...] -> m = ceil(n / chunk) arrays [chunk, ...]; the last is filled with copies of the last tile."""
    n = tiles.shape[0]
    m = -(-n // chunk)
    if m * chunk > n:
        tiles = jnp.concatenate([tiles, jnp.repeat(tiles[-1:], m * chunk - n, axis=0)], axis=0)
    return tuple(tiles[j * chunk:(j + 1) * chunk] for j in range(m))


def from_chunks(chunks: tuple[jax.Array, ...], n: int) -> jax.Array:
    return jnp.concatenate(chunks, axis=0)[:n]


def latent_tiles(z: jax.Array, layout: TileLayout, chunk: int) -> tuple[jax.Array, ...]:
    """The latent's tiles, tile-major, in chunks of `chunk`."""
    return to_chunks(extract_tiles(z, layout), chunk)


def tile_inputs(cond: jax.Array, context: jax.Array, layout: TileLayout, chunk: int,
                cond_dtype: Any) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The per-tile ControlNet image crops (x8 coordinates) and text contexts, chunked like the latent tiles."""
    cond_tiles = extract_tiles(cond, layout, PIXELS_PER_LATENT).astype(cond_dtype)
    ctx_tiles = repeat_for_tiles(context, layout.n_tiles)
    return to_chunks(cond_tiles, chunk), to_chunks(ctx_tiles, chunk)


def blend_chunks(chunks: tuple[jax.Array, ...], layout: TileLayout, batch: int) -> jax.Array:
    """The model outputs of `latent_tiles`' chunks -> the blended [batch, C, H, W] (padding tiles dropped)."""
    return blend_tiles(from_chunks(chunks, layout.n_tiles * batch), layout)
