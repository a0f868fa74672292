"""Pre/post-processing against the golden tiny pipeline, and the torch-semantics bilinear resize."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from pasd_jax import image_ops as io


@pytest.fixture(scope="module", params=["ddim", "unipc"])
def golden(request, golden_dir):
    return load_file(str(golden_dir / "tiny_pipeline" / f"pipeline_{request.param}.safetensors"))


def _uint8_report(name, ours, ref):
    diff = np.abs(np.asarray(ours, np.int32) - np.asarray(ref, np.int32))
    frac = float((diff > 0).mean())
    print(f"{name}: max |diff| {diff.max()}, {int((diff > 0).sum())} of {diff.size} values differ ({frac:.4%})")
    # Measured 0 differing values for both goldens; a value sitting on a rounding boundary may move by 1 (the golden
    # README's float64 run moves 1 of 12288 pipeline values).
    assert diff.max() <= 1 and frac <= 0.001


def test_preprocessing_reproduces_golden_upscale(golden, golden_dir):
    lq = golden["input.lq_image_uint8"]
    np.testing.assert_array_equal(np.asarray(Image.open(golden_dir / "tiny_pipeline" / "lq_32x32.png")), lq)
    ours = io.preprocess_official(lq, upscale=2, process_size=64)
    assert io.processed_size(32, 32, upscale=2, process_size=64) == (64, 64)
    diff = int(np.abs(ours.astype(int) - golden["input.upscaled_image_uint8"].astype(int)).max())
    print("upscaled image max |diff|", diff)
    assert diff == 0
    # The ControlNet condition is the same image in [0, 1].
    # measured 6.0e-8 (half an ulp below 1: the golden's float32 division is not always correctly rounded)
    np.testing.assert_allclose(np.asarray(io.to_float01(ours)).transpose(2, 0, 1), golden["controlnet_cond"][0],
                               atol=1e-7)


@pytest.mark.parametrize("w,h,upscale,process_size,expected", [
    (32, 32, 2, 64, (64, 64)),
    (128, 128, 4, 768, (768, 768)),      # spec 4.2 example
    (100, 50, 1, 768, (1536, 768)),      # short side to 768, long side 768 * 100 / 50
    (50, 101, 1, 768, (768, 1544)),      # int(768 * 101 / 50) = 1551 -> floor to 8
    (333, 500, 1, 300, (328, 496)),      # already large enough: only the multiple-of-8 floor
    (301, 170, 3, 512, (904, 512)),      # 903x510 -> short side 512, int(512 * 903 / 510) = 906 -> 904
])
def test_processed_size(w, h, upscale, process_size, expected):
    size = io.processed_size(w, h, upscale, process_size)
    assert size == expected
    # Agrees with the real PIL pipeline on a random image.
    img = np.random.default_rng(w + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.preprocess_official(img, upscale, process_size)
    assert (out.shape[1], out.shape[0]) == size


def test_grayscale_rules():
    # No upscale, resize always (here a downscale of the short side to 64), long side capped at 128.
    assert io.processed_size(100, 400, upscale=4, process_size=64, control_type="grayscale") == (32, 128)
    assert io.processed_size(200, 100, upscale=4, process_size=64, control_type="grayscale") == (128, 64)
    img = np.random.default_rng(0).integers(0, 256, (400, 100, 3), dtype=np.uint8)
    assert io.preprocess_official(img, 4, 64, control_type="grayscale").shape == (128, 32, 3)
    with pytest.raises(ValueError, match="control_type"):
        io.processed_size(10, 10, control_type="sketch")


def test_short_side_resize_with_max_size():
    assert io.short_side_resize_size(100, 400, 768, max_size=1536) == (384, 1536)
    assert io.short_side_resize_size(400, 100, 768) == (3072, 768)
    with pytest.raises(ValueError):
        io.short_side_resize_size(100, 100, 768, max_size=768)
    with pytest.raises(ValueError, match="too small"):
        io.processed_size(4, 4, 1, 2)


def test_to_uint8_round_matches_pipeline_output(golden):
    ours = np.asarray(io.to_uint8_round(golden["vae_decode_output"][0].transpose(1, 2, 0)))
    _uint8_report("to_uint8_round(vae_decode_output)", ours, golden["image_pipeline_output_uint8"])


def test_wavelet_color_fix_matches_golden(golden):
    target, source = golden["image_pipeline_output_uint8"], golden["input.upscaled_image_uint8"]
    unclamped = np.asarray(io.wavelet_reconstruction(io.to_float01(target), io.to_float01(source)))
    ref = golden["image_colorfix_float_unclamped"][0].transpose(1, 2, 0)
    err = float(np.abs(unclamped - ref).max())
    print("wavelet reconstruction max abs err", err)
    assert err <= 1e-5          # measured 2.1e-7 (|x| <= 0.71) for both goldens: float32 blur sums in another order
    _uint8_report("wavelet_color_fix", np.asarray(io.wavelet_color_fix(target, source)),
                  golden["image_final_colorfix_uint8"])
    # Truncation, not rounding: rounding would move thousands of values (spec appendix A13).
    rounded = np.round(np.clip(ref, 0, 1) * 255).astype(np.uint8)
    assert (rounded != golden["image_final_colorfix_uint8"]).sum() > 1000


def test_wavelet_batched_and_properties():
    rng = np.random.default_rng(0)
    x = rng.random((2, 24, 40, 3)).astype(np.float32)
    high, low = io.wavelet_decomposition(x)
    np.testing.assert_allclose(np.asarray(high + low), x, atol=1e-6)       # measured 6.0e-8 (x in [0, 1))
    const = np.full((1, 16, 16, 3), 0.3, np.float32)
    # measured 0; 1e-7 is ~3 float32 ulps of 0.3, room for the rounding of the blur weights' sum
    np.testing.assert_allclose(np.asarray(io.wavelet_blur(const, 8)), const, atol=1e-7)
    # Batched equals per-image.
    y = rng.random((2, 24, 40, 3)).astype(np.float32)
    batched = np.asarray(io.wavelet_reconstruction(x, y))
    single = np.asarray(io.wavelet_reconstruction(x[1], y[1]))
    np.testing.assert_allclose(batched[1], single, atol=1e-7)   # measured 0: the same per-image ops


def test_adain_color_fix():
    rng = np.random.default_rng(1)
    content = rng.random((20, 30, 3)).astype(np.float32)
    style = (rng.random((20, 30, 3)) * 0.5 + 0.2).astype(np.float32)
    out = np.asarray(io.adain(content, style))
    # Independent float64 transcription of calc_mean_std / adaptive_instance_normalization (unbiased var + 1e-5).
    c, s = content.astype(np.float64).reshape(-1, 3), style.astype(np.float64).reshape(-1, 3)
    c_std, s_std = np.sqrt(c.var(0, ddof=1) + 1e-5), np.sqrt(s.var(0, ddof=1) + 1e-5)
    ref = ((c - c.mean(0)) / c_std * s_std + s.mean(0)).reshape(content.shape)
    err = float(np.abs(out - ref).max())
    print("adain max abs err", err)
    assert err < 1e-5           # float32 vs the float64 transcription: measured 3.0e-7 (a few ulps)
    u8 = np.asarray(io.adain_color_fix((content * 255).astype(np.uint8), (style * 255).astype(np.uint8)))
    assert u8.dtype == np.uint8 and u8.shape == content.shape


def _torch_bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float64 transcription of ATen's upsample_bilinear2d (align_corners=False), one output pixel at a time."""
    in_h, in_w = x.shape[-2:]

    def src(dst, n_in, n_out):
        s = (dst + 0.5) * (n_in / n_out) - 0.5
        s = max(s, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        lam = s - i0
        return i0, i1, 1 - lam, lam
    out = np.zeros(x.shape[:-2] + (out_h, out_w))
    for oy in range(out_h):
        y0, y1, hy0, hy1 = src(oy, in_h, out_h)
        for ox in range(out_w):
            x0, x1, wx0, wx1 = src(ox, in_w, out_w)
            out[..., oy, ox] = (hy0 * (wx0 * x[..., y0, x0] + wx1 * x[..., y0, x1])
                                + hy1 * (wx0 * x[..., y1, x0] + wx1 * x[..., y1, x1]))
    return out


def test_bilinear_downsample_exact_factors():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 32, 48)).astype(np.float32)
    x2 = np.asarray(io.resize_bilinear_no_antialias(x, (16, 24)))
    box = x.reshape(2, 3, 16, 2, 24, 2).mean(axis=(3, 5))
    e2 = float(np.abs(x2 - box).max())
    errs = {2: e2}
    for f in (4, 8):
        out = np.asarray(io.resize_bilinear_no_antialias(x, (32 // f, 48 // f)))
        blocks = x.reshape(2, 3, 32 // f, f, 48 // f, f)
        c = f // 2
        central = blocks[:, :, :, c - 1:c + 1][:, :, :, :, :, c - 1:c + 1].mean(axis=(3, 5))
        errs[f] = float(np.abs(out - central).max())
    print("bilinear exact-factor max abs errs", errs)
    # measured 0 for factors 2, 4, 8 (weights 1/2); 1e-6 is ~2 ulps of |x| <= 3.85 for another summation order
    assert max(errs.values()) < 1e-6


def test_bilinear_matches_torch_formula_general_sizes():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 13, 10)).astype(np.float32)
    for size in [(5, 7), (26, 21), (13, 4), (9, 10)]:
        ours = np.asarray(io.resize_bilinear_no_antialias(x, size))
        ref = _torch_bilinear_reference(x.astype(np.float64), *size)
        err = float(np.abs(ours - ref).max())
        print("bilinear", size, "max abs err", err)
        # float32 vs the float64 formula: measured at most 1.2e-6 (~5 ulps of |x| <= 3.3)
        assert ours.shape == (1, 2) + size and err < 2e-6
    nhwc = np.asarray(io.resize_bilinear_no_antialias(x.transpose(0, 2, 3, 1), (5, 7), axes=(1, 2)))
    # measured 0: the same arithmetic on another axis order
    np.testing.assert_allclose(nhwc.transpose(0, 3, 1, 2), io.resize_bilinear_no_antialias(x, (5, 7)), atol=1e-7)


def test_psnr_ssim():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    # pytest.approx (relative 1e-6) below: measured exact equality for ssim(a, a), the PSNR formula and symmetry
    assert io.psnr(a, a) == float("inf") and io.ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a.astype(int) + 5, 0, 255)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert io.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    noisy1 = np.clip(a + rng.normal(0, 5, a.shape), 0, 255)
    noisy2 = np.clip(a + rng.normal(0, 40, a.shape), 0, 255)
    s1, s2 = io.ssim(a, noisy1), io.ssim(a, noisy2)
    print("ssim sigma 5 / 40:", s1, s2)
    assert 1 > s1 > s2 > 0
    assert io.ssim(a, noisy1) == pytest.approx(io.ssim(noisy1, a))
