"""Large-image paths of the sampler: latent tiling through the pipeline's tiled step (spec 4.7) and the tiled VAE.

- A per-pixel stand-in model gives the same latents tiled and untiled (coverage, condition crops, per-image text,
  chunking with a topped-up last chunk; the blend weights sum to one).
- With the tiny PASD models, one tiled step equals a numpy transcription of the official loop (grid with the last
  tile pinned, one model call per tile, Gaussian weights with the half-pixel asymmetry, weighted average, DDIM).
- The ControlNet + UNet program of the tiled path is traced once for two different large sizes.
- The tiled VAE equals the untiled VAE (exact GroupNorm statistics, global mid-block attention).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.convert import from_pytorch
from pasd_jax.sampling import vae_tiling
from pasd_jax.models.bundle import from_pairs
from pasd_jax.sampling.options import SamplingOptions
from pasd_jax.sampling.pipeline import PASDPipeline

PROMPT, NEGATIVE = "a bird, clean, high-resolution, 8k", "blurry, lowres"


@pytest.fixture(scope="module")
def models(golden_dir):
    tp, td = golden_dir / "tiny_pipeline", golden_dir / "tiny_pasd"
    return from_pairs(from_pytorch(td / "unet"), from_pytorch(td / "controlnet"), from_pytorch(tp / "vae"),
                      from_pytorch(tp / "text_encoder"))


@pytest.fixture(scope="module")
def pipe(models, golden_dir):
    return PASDPipeline(*models, golden_dir / "tiny_pipeline" / "scheduler", golden_dir / "tiny_pipeline" / "tokenizer")


def _images(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _keys(seed, n=1):
    return jax.random.split(jax.random.key(seed), n)


# --- numpy transcription of spec 4.7 (official tiled branch of the denoising loop) -----------------------------

def official_grid(h, w, tile_size, overlap):
    """Tile size and (y, x) offsets in the order of the official loops (x count "rows" outer, y "cols" inner)."""
    tile = min(tile_size, h, w)
    rows, cur = 0, 0
    while cur < w:
        cur = max(rows * tile - overlap * rows, 0) + tile
        rows += 1
    cols, cur = 0, 0
    while cur < h:
        cur = max(cols * tile - overlap * cols, 0) + tile
        cols += 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            ox = w - tile if r == rows - 1 else r * (tile - overlap)
            oy = h - tile if c == cols - 1 else c * (tile - overlap)
            boxes.append((oy, ox))
    return tile, boxes


def official_weights(tile):
    var = 0.01
    x = np.arange(tile, dtype=np.float64)
    px = np.exp(-(x - (tile - 1) / 2) ** 2 / (tile * tile) / (2 * var)) / np.sqrt(2 * np.pi * var)
    py = np.exp(-(x - tile / 2) ** 2 / (tile * tile) / (2 * var)) / np.sqrt(2 * np.pi * var)
    return np.outer(py, px)


# --- per-pixel stand-in model ----------------------------------------------------------------------------------

def standin_eps(params, z, t, context, cond, guidance, cond_scale):
    """A per-latent-pixel map of (z, the condition at the latent pixel's 8x8 block corner, t, text): tiles
    cannot change its output. Elementwise only (no reductions, whose summation order XLA picks per shape), so
    each pixel's value is bit-identical in a tile and in the whole latent. Mostly 0.9 z, roughly a denoiser of
    zero data, so the latents stay O(1) as with a real model."""
    corner = cond[:, :1, ::8, ::8]
    text = context[:, :, 0, :1]                             # [n, k, 1]
    base = 0.9 * z + 0.2 * jnp.tanh(0.3 * z + cond_scale * corner - 0.5) * (t.astype(jnp.float32) / 1000.0)
    pos = base + 0.1 * text[:, -1][:, :, None, None]
    if context.shape[1] == 1:
        return pos
    neg = 0.5 * base + 0.1 * text[:, 0][:, :, None, None]
    return neg + guidance * (pos - neg)


def test_per_pixel_model_tiled_equals_untiled(models, golden_dir):
    standin = PASDPipeline(*models, golden_dir / "tiny_pipeline" / "scheduler",
                           golden_dir / "tiny_pipeline" / "tokenizer", eps_fn_factory=lambda m: standin_eps)
    images = _images(0, (2, 96, 128, 3))                   # latent 12 x 16
    # Pure-noise start with injected draws of scale 0.3: |eps| stays ~1, so one float32 ulp of it (which two
    # separately compiled programs may round differently, e.g. FMA contraction of the CFG sum) stays ~1e-7
    # after DDIM's amplification (~2x).
    rng = np.random.default_rng(1)
    draws = {"noise": 0.3 * rng.standard_normal((2, 4, 12, 16)), "offset_noise": rng.standard_normal((2, 4, 1, 1))}
    common = dict(steps=3, scheduler="ddim", guidance_scale=3.0, init_noise=True, offset_noise_scale=0.1)
    untiled = standin.run(images, [PROMPT, "x"], [NEGATIVE], None, SamplingOptions(**common), draws=draws,
                          debug=True)
    tiled_opts = SamplingOptions(**common, latent_tile_size=8, latent_tile_overlap=3, tile_batch=5)  # 12 -> 3 x 5
    tiled = standin.run(images, [PROMPT, "x"], [NEGATIVE], None, tiled_opts, draws=draws, debug=True)
    n_tiles = 3 * 2                                         # y offsets 0, 4; x offsets 0, 5, 8
    assert tiled.tiled and not untiled.tiled
    assert standin.trace_counts["tiled_model"] == 1
    err = float(np.abs(tiled.latents - untiled.latents).max())
    z_err = float(np.abs(tiled.z_n - untiled.z_n).max())
    img_diff = int(np.abs(tiled.images.astype(int) - untiled.images).max())
    print(f"\nper-pixel stand-in, {n_tiles} tiles of 8 per image, 2 images in chunks of 5: z_N err {z_err:.1e}, "
          f"latents (3 steps, max |z| {np.abs(untiled.latents).max():.1f}) max abs err {err:.2e}, "
          f"uint8 max diff {img_diff}")
    # Measured 0, 0 and 0 (bit-identical on CPU). The bounds allow the ulp-level reordering described above (~1e-7
    # per step at |z| <= 0.6, 3 steps) and a uint8 value on a rounding boundary.
    assert z_err <= 1e-6 and err <= 1e-6 and img_diff <= 1


def test_tiny_models_tiled_step_matches_official_transcription(pipe):
    h, w = 12, 10
    # tile_batch=1: one tile per model call like the official loop, so the reference's model calls are the very
    # same computations (on CPU, XLA's fp32 result for a sample can move by ~1e-6 with its position in a batch, and
    # CFG at 9 and the DDIM step amplify that ~20x).
    opts = SamplingOptions(steps=4, scheduler="ddim", latent_tile_size=8, latent_tile_overlap=3, tile_batch=1)
    image = _images(2, (1, 8 * h, 8 * w, 3))
    r = pipe.run(image, [PROMPT], [NEGATIVE], _keys(3), opts, debug=True)
    assert r.tiled

    tile, boxes = official_grid(h, w, 8, 3)
    print(f"\nlatent {h}x{w}, tile {tile}, (y, x) offsets {boxes}")
    assert boxes == [(0, 0), (4, 0), (0, 2), (4, 2)]        # stride 5, the last tile of each axis pinned
    weights = official_weights(tile)
    assert weights[4, 0] == weights[4, 7] and weights[0, 3] != weights[7, 3]   # centre x 3.5, y 4

    z0 = np.asarray(r.z_n, np.float64)
    cond = image.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    context = np.asarray(pipe.encode_prompts([PROMPT], [NEGATIVE]))
    model = pipe.tile_noise_fn(opts, tile)
    t0 = int(pipe.scheduler("ddim", 4).timesteps[0])
    pred = np.zeros_like(z0)
    total = np.zeros_like(z0)
    for oy, ox in boxes:                                    # one tile per model call, as the official loop does
        zt = z0[:, :, oy:oy + tile, ox:ox + tile].astype(np.float32)
        ct = cond[:, :, 8 * oy:8 * (oy + tile), 8 * ox:8 * (ox + tile)]
        eps = np.asarray(model(zt, t0, context, ct), np.float64)
        pred[:, :, oy:oy + tile, ox:ox + tile] += eps * weights
        total[:, :, oy:oy + tile, ox:ox + tile] += weights
    eps = pred / total
    sched = pipe.scheduler("ddim", 4)                       # DDIM step 0, eta 0, float64
    a, b, a_prev = (float(np.asarray(v)[0]) for v in (sched.sqrt_alpha_t, sched.sqrt_beta_t, sched.sqrt_alpha_prev))
    d = float(np.asarray(sched.direction_coef)[0])
    ref = a_prev * (z0 - b * eps) / a + d * eps
    err = float(np.abs(r.latents[0] - ref).max())
    print(f"tiled step 0 vs numpy transcription: max abs err {err:.2e} (max |z| {np.abs(ref).max():.2f})")
    # float32 blend and DDIM step (1 / sqrt(abar) = 4.2) vs the float64 transcription: measured 8.1e-7 (|z| <= 7.3)
    assert err <= 3e-6


def test_tile_model_program_is_shared_across_large_sizes(pipe):
    opts = SamplingOptions(steps=4, scheduler="ddim", latent_tile_size=8, latent_tile_overlap=3, tile_batch=1)
    a = _images(4, (1, 96, 80, 3))
    pipe.sample(a, [PROMPT], [NEGATIVE], _keys(5), opts)    # compiles the programs of size A unless already done
    before = dict(pipe.trace_counts)
    pipe.sample(_images(6, (1, 96, 80, 3)), ["a cat"], [NEGATIVE], _keys(7), opts)
    assert dict(pipe.trace_counts) == before                 # same size: nothing traced
    out = pipe.sample(_images(8, (1, 80, 112, 3)), [PROMPT], [NEGATIVE], _keys(9), opts)   # latent 10 x 14
    after = dict(pipe.trace_counts)
    print(f"\ntraces before the second size {before}\n after {after}")
    assert out.shape == (1, 80, 112, 3)
    assert after["tiled_model"] == before["tiled_model"] == 1  # one ControlNet + UNet program for both sizes
    for name in ("tiled_prepare", "tiled_step", "tiled_finish"):
        assert after[name] == before[name] + 1             # the cheap per-size programs


def test_tiled_vae_matches_untiled(models):
    vae, params = models[0].vae, models[1]["vae"]
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 3, 96, 80)), jnp.float32)
    z = jnp.asarray(3 * rng.standard_normal((2, 4, 12, 10)), jnp.float32)
    enc = jax.jit(lambda p, x, tile=None: vae_tiling.encode(vae, p, x, tile), static_argnums=2)
    dec = jax.jit(lambda p, z, tile=None: vae_tiling.decode(vae, p, z, tile), static_argnums=2)
    (m0, l0), (m1, l1) = enc(params, x, None), enc(params, x, 32)      # 3 x 3 encoder tiles of 32 px, last pinned
    d0, d1 = dec(params, z, None), dec(params, z, 4)                   # 3 x 3 decoder tiles of 4 latent px
    errors = {"mean": float(jnp.abs(m0 - m1).max()), "logvar": float(jnp.abs(l0 - l1).max()),
              "decode": float(jnp.abs(d0 - d1).max())}
    print(f"\ntiled vs untiled tiny VAE: {errors} (max |decode| {float(jnp.abs(d0).max()):.2f})")
    # Measured 9.5e-7 (mean), 1.1e-6 (logvar), 2.3e-6 (decode, |x| <= 2.8): the same sums in another order
    assert max(errors.values()) <= 1e-5


def test_vae_tiling_thresholds_follow_the_official():
    r = vae_tiling.resolve_vae_tiling
    assert r("auto", 1088, 1088, 1024, 224) == vae_tiling.VAETiling(None, None)
    assert r("auto", 1096, 800, 1024, 224) == vae_tiling.VAETiling(1024, None)
    assert r("auto", 1968, 1968, 1024, 224) == vae_tiling.VAETiling(1024, None)     # 246 latent px: untiled
    assert r("auto", 1976, 64, 1024, 224) == vae_tiling.VAETiling(1024, 224)
    assert r("on", 64, 64, 1024, 224) == vae_tiling.VAETiling(1024, 224)
    assert r("off", 8192, 8192, 1024, 224) == vae_tiling.VAETiling(None, None)
    with pytest.raises(ValueError, match="tiled_vae"):
        r("sometimes", 64, 64, 1024, 224)
