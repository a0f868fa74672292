"""Latent tiling (spec 4.7) against an independent numpy transcription of the official loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.sampling import tiling


# --- plain numpy transcription of pipeline_pasd.py's tiled branch (written from spec 4.7, not from the module) ---

def official_grid(h, w, tile_size, overlap):
    tile_size = min(tile_size, min(h, w))
    grid_rows, cur_x = 0, 0
    while cur_x < w:
        cur_x = max(grid_rows * tile_size - overlap * grid_rows, 0) + tile_size
        grid_rows += 1
    grid_cols, cur_y = 0, 0
    while cur_y < h:
        cur_y = max(grid_cols * tile_size - overlap * grid_cols, 0) + tile_size
        grid_cols += 1
    boxes = []
    for row in range(grid_rows):
        for col in range(grid_cols):
            if col < grid_cols - 1 or row < grid_rows - 1:
                ofs_x = max(row * tile_size - overlap * row, 0)
                ofs_y = max(col * tile_size - overlap * col, 0)
            if row == grid_rows - 1:
                ofs_x = w - tile_size
            if col == grid_cols - 1:
                ofs_y = h - tile_size
            boxes.append((ofs_y, ofs_x))
    return tile_size, boxes


def official_weights(tile):
    var = 0.01
    mid = (tile - 1) / 2
    x_probs = [np.exp(-(x - mid) * (x - mid) / (tile * tile) / (2 * var)) / np.sqrt(2 * np.pi * var)
               for x in range(tile)]
    mid = tile / 2
    y_probs = [np.exp(-(y - mid) * (y - mid) / (tile * tile) / (2 * var)) / np.sqrt(2 * np.pi * var)
               for y in range(tile)]
    return np.outer(y_probs, x_probs)


def official_stitch(fn, x, cond, tile_size, overlap):
    _, _, h, w = x.shape
    tile, boxes = official_grid(h, w, tile_size, overlap)
    weights = official_weights(tile)
    pred = np.zeros(x.shape, np.float64)
    contributors = np.zeros(x.shape, np.float64)
    for oy, ox in boxes:
        c = None if cond is None else cond[:, :, oy * 8:(oy + tile) * 8, ox * 8:(ox + tile) * 8]
        out = fn(x[:, :, oy:oy + tile, ox:ox + tile], c)
        pred[:, :, oy:oy + tile, ox:ox + tile] += out * weights
        contributors[:, :, oy:oy + tile, ox:ox + tile] += weights
    return pred / contributors


# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,t,o", [(40, 56, 24, 8), (96, 64, 32, 8), (33, 70, 16, 4), (400, 330, 320, 8),
                                     (64, 2000, 320, 8), (24, 24, 24, 8), (50, 100, 50, 0)])
def test_layout_and_weights_match_official(h, w, t, o):
    layout = tiling.tile_layout(h, w, t, o)
    tile, boxes = official_grid(h, w, t, o)
    print(f"{h}x{w} T={t} O={o}: T'={layout.tile}, {len(layout.offsets_y)}x{len(layout.offsets_x)} tiles,"
          f" y {layout.offsets_y}, x {layout.offsets_x}")
    assert layout.tile == tile
    assert list(layout.origins) == boxes
    assert layout.offsets_y[-1] == h - tile and layout.offsets_x[-1] == w - tile
    np.testing.assert_array_equal(tiling.gaussian_weights(tile), official_weights(tile))
    weights = official_weights(tile)
    assert weights[tile // 2, 0] == weights[tile // 2, tile - 1]          # x centred at (T-1)/2
    if tile > 1:
        assert weights[0, tile // 2] != weights[tile - 1, tile // 2]      # y centred at T/2: half-pixel asymmetry
    # Normalised weights: official weight / official per-pixel weight sum, so they sum to 1 everywhere.
    norm = tiling.normalized_tile_weights(layout)
    total = np.zeros((h, w))
    contributors = np.zeros((h, w))
    for k, (oy, ox) in enumerate(boxes):
        total[oy:oy + tile, ox:ox + tile] += norm[k]
        contributors[oy:oy + tile, ox:ox + tile] += weights
    oy, ox = boxes[-1]
    want = weights / contributors[oy:oy + tile, ox:ox + tile]
    print(f"  max |sum of weights - 1| {np.abs(total - 1).max():.2e}, last tile's weights max relative error "
          f"{np.max(np.abs(norm[-1] - want) / want):.2e}")
    # float32 weights (divided in float64, rounded once): their float64 sums are measured <= 4.5e-8 from 1 (the
    # rounding of <= 4 weights, each half an ulp) and each weight <= 5.9e-8 relative from its float64 value (half a
    # float32 ulp, 6e-8: the bound, not slack).
    np.testing.assert_allclose(total, 1.0, rtol=3e-7)
    np.testing.assert_allclose(norm[-1], want, rtol=1e-7)


def test_needs_tiling_compares_areas():
    assert not tiling.needs_tiling(320, 320, 320)
    assert tiling.needs_tiling(321, 320, 320)
    assert not tiling.needs_tiling(100, 1000, 320)       # 1e5 < 320^2 although 1000 > 320
    assert tiling.needs_tiling(64, 2000, 320)


def test_thin_image_overlap_is_capped():
    layout = tiling.tile_layout(8, 5000, 320, 8)          # official loop would not terminate (T' = O = 8)
    assert layout.tile == 8 and layout.overlap == 7
    assert layout.offsets_x[-1] == 5000 - 8 and all(np.diff(layout.offsets_x) >= 1)


def _per_pixel(x, c=None):
    y = jnp.sin(2 * x) + 0.3 * x * x
    if c is not None:  # the pixel-space condition averaged to latent resolution: still a per-latent-pixel map
        b, ch, hh, ww = c.shape
        y = y + c.reshape(b, ch, hh // 8, 8, ww // 8, 8).mean(axis=(3, 5))[:, :1]
    return y


def _tiled(fn, x, cond, layout, chunk):
    """The sampler's tiled path around a stand-in model: chunks of latent + condition tiles, blended."""
    z_chunks = tiling.latent_tiles(x, layout, chunk)
    c_chunks, _ = tiling.tile_inputs(cond, jnp.zeros((x.shape[0], 1)), layout, chunk, jnp.float32)
    return tiling.blend_chunks(tuple(fn(z, c) for z, c in zip(z_chunks, c_chunks)), layout, x.shape[0])


@pytest.mark.parametrize("tiles_per_call", [None, 3])
def test_tiled_equals_untiled_for_per_pixel_model(tiles_per_call):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 40, 56)), jnp.float32)
    cond = jnp.asarray(rng.random((2, 3, 320, 448)), jnp.float32)
    layout = tiling.tile_layout(40, 56, 24, 8)
    assert len(layout.offsets_y) >= 2 and len(layout.offsets_x) >= 2
    chunk = tiles_per_call or layout.n_tiles * x.shape[0]
    run = jax.jit(lambda x, c: _tiled(_per_pixel, x, c, layout, chunk))
    tiled = np.asarray(run(x, cond))
    untiled = np.asarray(jax.jit(_per_pixel)(x, cond))  # jit both: XLA fusion alone moves sin() by an ulp
    err = float(np.abs(tiled - untiled).max())
    print(f"tiled ({layout.n_tiles} tiles, tiles_per_call={tiles_per_call}) vs untiled max abs err {err}"
          f" (max |y| {np.abs(untiled).max():.2f})")
    # Measured 0 for both chunkings; allowed 2 float32 ulps of the largest |y| (6.2, ulp 4.8e-7) for the weighted
    # sum's rounding.
    assert err <= 1e-6


def test_stitched_result_matches_official_transcription():
    """A non-local stand-in (depends on the whole tile and its condition crop) stitched like the official code."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 33, 70)).astype(np.float32)
    cond = rng.random((1, 3, 33 * 8, 70 * 8)).astype(np.float32)

    def model(xt, ct):
        xp = jnp if isinstance(xt, jax.Array) else np
        return xt * xp.mean(ct, axis=(1, 2, 3), keepdims=True) + xp.mean(xt, axis=(2, 3), keepdims=True)
    layout = tiling.tile_layout(33, 70, 16, 4)
    calls = []

    def counted(xt, ct):
        calls.append(xt.shape)
        return model(xt, ct)
    ours = np.asarray(_tiled(counted, jnp.asarray(x), jnp.asarray(cond), layout, layout.n_tiles))
    ref = official_stitch(lambda a, c: model(a.astype(np.float64), c.astype(np.float64)), x, cond, 16, 4)
    err = float(np.abs(ours - ref).max())
    print(f"stitched vs official transcription: {layout.n_tiles} tiles in {len(calls)} call(s) of {calls[0]},"
          f" max abs err {err} (max |ref| {np.abs(ref).max():.2f})")
    assert calls == [(layout.n_tiles, 4, 16, 16)]      # all tiles of the image in one batch
    # float32 model and blend vs the float64 transcription: measured 3.1e-7 (|ref| <= 2.04, ~1.3 float32 ulps)
    assert err <= 1e-6


def test_extract_and_repeat_are_tile_major():
    x = jnp.arange(2 * 1 * 6 * 6, dtype=jnp.float32).reshape(2, 1, 6, 6)
    layout = tiling.tile_layout(6, 6, 4, 2)
    tiles = tiling.extract_tiles(x, layout)
    assert tiles.shape == (layout.n_tiles * 2, 1, 4, 4)
    for k, (oy, ox) in enumerate(layout.origins):
        for b in range(2):
            np.testing.assert_array_equal(tiles[k * 2 + b], x[b, :, oy:oy + 4, ox:ox + 4])
    ctx = jnp.asarray([[1.0], [2.0]])
    np.testing.assert_array_equal(tiling.repeat_for_tiles(ctx, 3)[:, 0], [1, 2, 1, 2, 1, 2])
    with pytest.raises(ValueError, match="spatial size"):
        tiling.extract_tiles(x[..., :5], layout)
