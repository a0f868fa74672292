"""Each degradation op against closed-form expectations (kernels, blur borders, torch-style resize, DiffJPEG)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy import stats

from data_pipeline import kernels, resize
from data_pipeline.degradation import blur, quantise
from data_pipeline.diffjpeg import LUMA_TABLE, dct_matrix, diff_jpeg, quality_to_factor
from data_pipeline.presets import PASD

# ------------------------------------------------------------------------------------------------- kernels


def test_gaussian_kernel_closed_form_and_orientation():
    size, sx, sy = 9, 2.5, 0.7
    k = kernels.gaussian_kernel(size, sx, sy, 0.0)
    x = np.arange(size) - 4
    expected = np.exp(-0.5 * (x[None, :] ** 2 / sx**2 + x[:, None] ** 2 / sy**2))  # x along columns
    rot = kernels.gaussian_kernel(size, sx, sy, np.pi / 2)
    print("max relative errors: closed form", np.max(np.abs(k / (expected / expected.sum()) - 1)),
          "rotated vs transposed", np.max(np.abs(rot / k.T - 1)), "; sum - 1", k.sum() - 1)
    # float64 throughout; measured 1.8e-15 and 3.6e-15 relative (cos(pi/2) = 6e-17, not 0), sum exactly 1. Were
    # rtol 1e-12 + atol 1e-15 (the atol alone admits 5e-7 relative on the 2e-9 corners) and atol 1e-12.
    np.testing.assert_allclose(k, expected / expected.sum(), rtol=1e-14, atol=0)
    assert k.sum() == pytest.approx(1.0, abs=1e-15)
    # rotating by 90 degrees swaps the axes: the kernel transposes
    np.testing.assert_allclose(rot, k.T, rtol=2e-14, atol=0)


def test_rotated_gaussian_quadratic_form():
    # Q = [x, y] R diag(1/sx^2, 1/sy^2) R^T [x, y]^T, checked at one grid point
    sx, sy, th = 2.0, 0.8, 0.6
    q = kernels.quadratic_form(7, sx, sy, th)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    inv = r @ np.diag([1 / sx**2, 1 / sy**2]) @ r.T
    v = np.array([2.0, -1.0])  # x = 2 (column 5), y = -1 (row 2)
    assert q[2, 5] == pytest.approx(v @ inv @ v, rel=1e-15)       # measured 0 (float64; was rel 1e-12)


def test_generalized_and_plateau_formulas():
    size, sx, sy, th, beta = 11, 1.7, 1.1, 0.3, 2.5
    q = kernels.quadratic_form(size, sx, sy, th)
    g = np.exp(-0.5 * q**beta)
    # float64, measured 0 (bit-equal) in all three checks below; rtol 1e-15 (a few ulps; was 1e-12)
    np.testing.assert_allclose(kernels.generalized_gaussian_kernel(size, sx, sy, th, beta), g / g.sum(), rtol=1e-15)
    p = 1.0 / (1.0 + q**beta)
    np.testing.assert_allclose(kernels.plateau_kernel(size, sx, sy, th, beta), p / p.sum(), rtol=1e-15)
    # beta = 1 generalized Gaussian is the Gaussian
    np.testing.assert_allclose(kernels.generalized_gaussian_kernel(size, sx, sy, th, 1.0),
                               kernels.gaussian_kernel(size, sx, sy, th), rtol=1e-15)


def test_sinc_kernel_centre_and_symmetry():
    size, wc = 13, 1.9
    k = kernels.sinc_kernel(size, wc)
    raw = np.fromfunction(lambda i, j: np.hypot(i - 6, j - 6), (size, size))
    from scipy import special

    with np.errstate(all="ignore"):
        ref = wc * special.j1(wc * raw) / (2 * np.pi * raw)
    ref[6, 6] = wc**2 / (4 * np.pi)  # the limit of wc J1(wc r) / (2 pi r) at r = 0
    np.testing.assert_allclose(k, ref / ref.sum(), rtol=1e-15)      # measured 0 (float64; was rtol 1e-12)
    np.testing.assert_allclose(k, k.T, atol=0)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=0)


def test_iso_gaussian_is_separable():
    g = kernels.gaussian_1d(15, 1.3)
    # measured 3.4e-15 relative (float64; was rtol 1e-12)
    np.testing.assert_allclose(np.outer(g, g), kernels.gaussian_kernel(15, 1.3, 1.3, 0.0), rtol=2e-14)


def test_trim_drops_only_negligible_rings():
    k = kernels.gaussian_kernel(21, 0.4, 0.5, 0.2)  # tiny sigma: the outer rings are ~0
    t = kernels.trim(k)
    assert t.shape[0] < 21 and t.shape[0] % 2 == 1
    assert k.sum() - t.sum() <= kernels.TRIM_TOL      # trim's own contract (1e-9); measured 1.1e-14 dropped
    c, r = 10, t.shape[0] // 2
    np.testing.assert_array_equal(t, k[c - r:c + r + 1, c - r:c + r + 1])
    wide = kernels.gaussian_kernel(21, 3.0, 3.0, 0.0)
    assert kernels.trim(wide).shape == (21, 21)  # nothing negligible to drop


def test_plateau_beta_quirk_is_exactly_one_half_the_time():
    rng = np.random.default_rng(0)
    betas = np.array([kernels._beta(rng, PASD.stage1.kernel.betap_range) for _ in range(4000)])
    frac_one = np.mean(betas == 1.0)
    assert abs(frac_one - 0.5) < 4 * math.sqrt(0.25 / 4000)    # 4 binomial sigmas (0.032); measured 0.0018
    assert betas.min() >= 1.0 and betas.max() <= 2.0


def test_sampled_kernels_are_normalised_odd_and_typed():
    rng = np.random.default_rng(1)
    n_sep, worst = 0, 0.0
    for _ in range(300):
        k = kernels.sample_blur_kernel(rng, PASD.stage1.kernel)
        assert k.k2d.dtype == np.float32 and k.k2d.shape[0] % 2 == 1 and k.k2d.shape[0] <= 21
        worst = max(worst, abs(float(k.k2d.sum()) - 1.0))
        n_sep += k.separable is not None
    print(f"max |float32 kernel sum - 1| {worst:.2e}; separable fraction {n_sep / 300:.3f}")
    # float64-normalised kernels rounded to float32: measured 1.2e-7 (1 ulp at 1) over 300 draws; was 1e-5 (84x)
    assert worst < 1e-6
    # iso Gaussians are 0.9 * 0.45 of the draws; 4 binomial sigmas (0.113), measured 0.052 off
    assert abs(n_sep / 300 - 0.405) < 4 * math.sqrt(0.405 * 0.595 / 300)


# ---------------------------------------------------------------------------------------------------- blur


@pytest.mark.parametrize("size", [3, 15])  # the direct (cv2) and the FFT path
def test_blur_is_correlation_with_reflect101_borders(size):
    rng = np.random.default_rng(0)
    img = rng.random((20, 23, 3), dtype=np.float32)
    k = np.zeros((size, size), np.float32)
    c = size // 2
    k[c, c + 1] = 1.0  # correlation picks the right-hand neighbour
    out = blur(img, kernels.Kernel(k))
    # measured 0 (cv2, size 3) and 2.5e-7 (FFT, size 15: float32 transforms of values in [0, 1))
    np.testing.assert_allclose(out[:, :-1], img[:, 1:], atol=2e-6)
    np.testing.assert_allclose(out[:, -1], img[:, -2], atol=2e-6)  # reflect-101: W-1+1 -> W-2


def test_blur_fft_path_matches_direct_convolution():
    rng = np.random.default_rng(3)
    img = rng.random((40, 37, 3), dtype=np.float32)
    k = kernels.plateau_kernel(17, 2.0, 1.0, 0.4, 1.5).astype(np.float32)
    k[0, 1] += 0.01  # not point-symmetric: checks the correlation orientation
    p = 8
    padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="reflect")  # numpy 'reflect' == reflect-101
    ref = np.zeros_like(img, dtype=np.float64)
    for dy in range(17):
        for dx in range(17):
            ref += k[dy, dx] * padded[dy:dy + 40, dx:dx + 37]
    np.testing.assert_allclose(blur(img, kernels.Kernel(k)), ref, atol=5e-6)   # measured 2.0e-7 (|ref| <= 0.69)


# -------------------------------------------------------------------------------------------------- resize


def test_area_is_adaptive_average_pooling_not_cv2_area():
    x = np.arange(5, dtype=np.float32)[None, :, None].repeat(2, 0)  # 2 x 5 x 1
    out = resize.resize_to(x, 2, 3, "area")[0, :, 0]
    # torch windows for 5 -> 3: [0, 2), [1, 4), [3, 5)
    np.testing.assert_allclose(out, [0.5, 2.0, 3.5], atol=1e-6)   # measured 0 (exact means); 1e-6 ~4 ulps of 3.5
    cv = cv2.resize(x, (3, 2), interpolation=cv2.INTER_AREA)[0]
    assert not np.allclose(cv, out, atol=1e-3)  # cv2's fractional-weight area differs (measured by 0.1)


def test_area_integer_factors():
    rng = np.random.default_rng(0)
    x = rng.random((8, 12, 3), dtype=np.float32)
    # measured 6.0e-8 (half an ulp of values in [0, 1))
    np.testing.assert_allclose(resize.resize_to(x, 4, 3, "area"), x.reshape(4, 2, 3, 4, 3).mean((1, 3)), atol=1e-6)
    up = resize.resize_to(x, 32, 48, "area")
    np.testing.assert_array_equal(up, np.repeat(np.repeat(x, 4, 0), 4, 1))  # 4x up-scale is replication


def test_bilinear_scale_factor_uses_one_over_scale():
    n, s = 512, 0.7317  # floor(512 s) = 374, and 512/374 != 1/s
    ramp = np.tile(np.arange(n, dtype=np.float32), (4, 1))[:, :, None].repeat(3, 2)
    out = resize.resize_by(ramp, s, "bilinear")
    assert out.shape[:2] == (math.floor(4 * s), math.floor(n * s))
    j = np.arange(out.shape[1])
    expected = np.clip((j + 0.5) / s - 0.5, 0, n - 1)  # torch: src = (dst + 0.5) / scale - 0.5
    print("ramp vs (dst + 0.5) / scale - 0.5: max abs err", np.abs(out[0, :, 0] - expected).max())
    # float32 source positions up to 511 (ulp 3e-5): measured 1.5e-5. Was atol 2e-3 (130x), now 1e-4.
    np.testing.assert_allclose(out[0, :, 0], expected, atol=1e-4)
    by_size = np.clip((j + 0.5) * n / out.shape[1] - 0.5, 0, n - 1)  # the In/Out mapping drifts
    assert np.abs(by_size - expected).max() > 0.05     # measured 0.86


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def test_bicubic_uses_a_minus_075_without_antialias():
    x = np.zeros((1, 16, 1), np.float32)
    x[0, 8, 0] = 1.0
    x = np.repeat(x, 4, axis=0)
    up = resize.resize_to(x, 8, 32, "bicubic")[0, :, 0]
    for j in range(8, 24):
        src = (j + 0.5) / 2 - 0.5
        assert up[j] == pytest.approx(_cubic(src - 8), abs=1e-6), j    # measured 0; 1e-6 ~8 float32 ulps at 1
    down = resize.resize_to(np.tile(x, (1, 2, 1)), 4, 16, "bicubic")  # 32 -> 16: no antialias, taps stay 4
    assert np.count_nonzero(np.abs(down[0, :, 0]) > 1e-7) <= 4


def test_resize_keeps_three_channels_at_tiny_sizes():
    x = np.random.default_rng(0).random((5, 7, 3), dtype=np.float32)
    for mode in ("area", "bilinear", "bicubic"):
        assert resize.resize_by(x, 1.37, mode).shape == (6, 9, 3)
        assert resize.resize_to(x, 2, 3, mode).shape == (2, 3, 3)


# ---------------------------------------------------------------------------------------------------- jpeg


def test_quality_to_factor():
    # pytest.approx's relative 1e-6: measured exact equality for all three
    assert quality_to_factor(75.0) == pytest.approx(0.5)
    assert quality_to_factor(60.0) == pytest.approx(0.8)
    assert quality_to_factor(30.0) == pytest.approx(5000 / 30 / 100)
    with pytest.raises(ValueError):
        quality_to_factor(100.0)


def _ycc(rgb):
    m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    return rgb @ m.T


def _rgb(ycc):
    m = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
    return ycc @ m.T


@pytest.mark.parametrize("colour", [(200, 30, 40), (30, 40, 200)])
def test_jpeg_flat_block_closed_form_on_rgb(colour):
    """A flat 16x16 block keeps only DC terms: Y' = 128 + round(8 (Y-128) / (16 f)) 16 f / 8, chroma alike."""
    q = 70.0
    f = quality_to_factor(q)
    img = np.full((16, 16, 3), colour, np.float32) / 255.0
    y, cb, cr = _ycc(np.array(colour, np.float64))
    y2 = 128 + np.round(8 * (y - 128) / (16 * f)) * 16 * f / 8
    cb2 = np.round(8 * cb / (17 * f)) * 17 * f / 8
    cr2 = np.round(8 * cr / (17 * f)) * 17 * f / 8
    expected = np.clip(_rgb(np.array([y2, cb2, cr2])), 0, 255) / 255
    out = diff_jpeg(img, q)
    swapped = diff_jpeg(img[:, :, ::-1].copy(), q)[:, :, ::-1]
    print(f"flat block vs closed form: max abs err {np.abs(out - expected).max():.2e}; "
          f"read as BGR: max change {np.abs(swapped - out).max():.2e}")
    # float32 DCT of a flat block vs the float64 closed form: measured 4.3e-8 / 7.0e-8 (about an ulp at 1). Was
    # atol 2e-5 (~290x), now 3e-7.
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=3e-7)
    # the same numbers read as BGR would be a different colour: the input is taken as RGB (measured 4.4e-3, 5.3e-3)
    assert np.abs(swapped - out).max() > 1e-3


def test_jpeg_tables_are_transposed_relative_to_blocks():
    """A horizontal cosine at frequency 7 is quantised by LUMA_TABLE[0, 7] = 72 (standard table: 61)."""
    assert LUMA_TABLE[0, 7] == 72
    d = dct_matrix()
    amp = 100.0
    block = 128 + amp * np.outer(d[0], d[7]) / d[0, 0] / 8  # coefficient (u=0, v=7) only
    img = np.repeat(np.tile(block, (2, 2))[:, :, None], 3, axis=2).astype(np.float32) / 255.0
    f = quality_to_factor(50.0)
    out = diff_jpeg(img, 50.0)[:8, :8, 0] * 255
    coef_in = (d @ (block - 128) @ d.T)[0, 7]
    coef_out = (d @ (out.astype(np.float64) - 128) @ d.T)[0, 7]
    # coef_in = 35.4: quantised to 0 by 72, to 61 by 61; measured coef_out 0 (|err| 0, 61 from the wrong table)
    assert coef_out == pytest.approx(np.round(coef_in / (72 * f)) * 72 * f, abs=1e-3)
    assert coef_out != pytest.approx(np.round(coef_in / (61 * f)) * 61 * f, abs=1e-3)


def test_jpeg_chroma_is_2x2_mean_replicated():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3)).astype(np.float32) * 0.5 + 0.25
    out = diff_jpeg(img, 99.999).astype(np.float64) * 255  # steps ~0: only subsampling remains
    ycc_in, ycc_out = _ycc(img.astype(np.float64) * 255), _ycc(out)
    # measured 1.6e-3 (Y) and 1.6e-3 (chroma) levels of 255: quality 99.999 still quantises, with steps of
    # 2e-5 x the table entry (a few 1e-3 levels)
    np.testing.assert_allclose(ycc_out[..., 0], ycc_in[..., 0], atol=0.02)
    cell = ycc_in[..., 1:].reshape(16, 2, 16, 2, 2).mean((1, 3))
    np.testing.assert_allclose(ycc_out[..., 1:], np.repeat(np.repeat(cell, 2, 0), 2, 1), atol=0.02)


def test_jpeg_zero_pads_to_16_at_bottom_right():
    img = np.full((36, 36, 3), 0.8, np.float32)  # padded to 48 with black: rows/cols 36..39 share blocks
    out = diff_jpeg(img, 80.0)
    assert out.shape == img.shape
    full = diff_jpeg(np.full((48, 48, 3), 0.8, np.float32), 80.0)[:36, :36]
    assert np.abs(out[:32, :32] - full[:32, :32]).max() < 1e-6  # blocks without padding are unchanged (measured 0)
    # the black padding shares the last blocks: quantising its edge rings into the image there
    assert np.abs(out[32:, :] - full[32:, :]).max() > 0.01
    assert np.abs(out[:, 32:] - full[:, 32:]).max() > 0.01      # measured 0.043 for both


# --------------------------------------------------------------------------------------------------- misc


def test_final_quantise_rounds_half_to_even_and_clamps():
    x = np.array([[[-0.1, 0.5 / 255, 1.5 / 255]], [[2.5 / 255, 1.2, 254.5 / 255]]], np.float32)
    np.testing.assert_array_equal(quantise(x).ravel(), [0, 0, 2, 2, 255, 254])


def test_poisson_table_tail_below_float64_resolution():
    from data_pipeline.noise import poisson_table

    t = poisson_table(256)
    lam = 256.0
    k_last = t.width - 2
    assert stats.poisson.sf(k_last, lam) < 1e-16      # float64 resolution at 1 is 1.1e-16; measured 2.4e-35


# --------------------------------------------------------------------------------------------------- noise


def test_gray_weights_are_torchvision_on_rgb():
    from data_pipeline.noise import to_gray

    px = np.eye(3, dtype=np.float32)[:, None, :]  # pure R, G, B pixels
    np.testing.assert_allclose(to_gray(px)[:, 0], [0.2989, 0.587, 0.114], rtol=1e-6)   # measured 2.7e-8 (float32)


@pytest.mark.parametrize("kind", ["gaussian", "poisson"])
def test_gray_noise_identical_across_channels_colour_noise_not(kind):
    from data_pipeline import noise

    rng = np.random.default_rng(0)
    img = rng.random((64, 64, 3), dtype=np.float32) * 0.6 + 0.2  # no clipping
    for gray in (True, False):
        n = (noise.gaussian_noise(rng, img.shape, 10.0, gray) if kind == "gaussian"
             else noise.poisson_noise(rng, img, 1.0, gray))
        d = noise.add_noise(img, n) - img
        # grey: measured 6e-8 between channels (clip rounding); colour: 0.22 (gaussian) / 0.25 (poisson)
        same = np.allclose(d[..., 0], d[..., 1], atol=1e-6) and np.allclose(d[..., 0], d[..., 2], atol=1e-6)
        assert same == gray


def test_gaussian_noise_sigma_on_255_scale():
    from data_pipeline.noise import gaussian_noise

    n = gaussian_noise(np.random.default_rng(0), (256, 256, 3), 12.0, False)
    assert n.dtype == np.float32
    assert n.std() == pytest.approx(12.0 / 255, rel=4 / math.sqrt(2 * n.size))   # 4 sigmas (6.4e-3); measured 2.2e-3


def test_poisson_vals_is_next_power_of_two_of_level_count():
    from data_pipeline.noise import poisson_vals

    assert poisson_vals(np.array([7, 7, 7], np.uint8)) == 1
    assert poisson_vals(np.array([1, 2, 3], np.uint8)) == 4
    assert poisson_vals(np.array([0, 9, 200, 201, 202], np.uint8)) == 8
    assert poisson_vals(np.arange(256, dtype=np.uint8)) == 256


@pytest.mark.parametrize("vals,level", [(256, 255), (256, 100), (256, 3), (4, 200), (1, 128)])
def test_poisson_sampler_matches_the_poisson_law(vals, level):
    from data_pipeline.noise import poisson_table

    lam = vals * level / 255
    counts = poisson_table(vals).sample(np.random.default_rng(level), np.full(200_000, level, np.uint8))
    k = counts.astype(np.int64)
    # chi-square over the bins holding 99.9% of the mass (tails pooled)
    lo, hi = int(stats.poisson.ppf(5e-4, lam)), int(stats.poisson.ppf(1 - 5e-4, lam))
    obs = np.bincount(np.clip(k, lo, hi) - lo, minlength=hi - lo + 1)
    p = stats.poisson.pmf(np.arange(lo, hi + 1), lam)
    p[0], p[-1] = stats.poisson.cdf(lo, lam), stats.poisson.sf(hi - 1, lam)
    exp = p / p.sum() * k.size
    assert stats.chisquare(obs, exp).pvalue > 1e-3     # measured p-values 0.078 to 0.97 over the 5 cases


def test_poisson_noise_variance_closed_form():
    from data_pipeline.noise import poisson_noise

    img = np.full((200, 200, 3), 77 / 255, np.float32)  # one level -> vals = 1
    n = poisson_noise(np.random.default_rng(0), img, 0.5, gray=False)
    # noise = scale (Poisson(v x) / v - x): mean 0, variance scale^2 x / v
    assert n.mean() == pytest.approx(0.0, abs=4 * math.sqrt(0.25 * 77 / 255 / n.size))   # 4 sigmas; measured 2.8e-4
    # the sample variance's relative sigma is 0.0066 (20 seeds: 0.0065), so 0.02 is 3 sigmas; measured 1.8e-6 here
    assert n.var() == pytest.approx(0.25 * 77 / 255, rel=0.02)
