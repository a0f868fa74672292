"""PASD's two-stage Real-ESRGAN degradation on the host: numpy / OpenCV / scipy, float32, one image at a time.

Order of operations (PASD's `degrade_process` with `resize_bak=True`, USM off):
  stage 1: blur k1 -> resize by a random scale (up/down/keep) -> Gaussian or Poisson noise -> DiffJPEG
  stage 2: blur k2 (prob) -> resize to (H/4 * s) -> noise -> 50/50 either
           [resize to H/4 -> final sinc -> DiffJPEG] or [DiffJPEG -> resize to H/4 -> final sinc]
  then resize back to H x W with a random mode, round to 8-bit levels.
Every random choice is drawn per image from the one `np.random.Generator` given, so the result is a pure
function of (image, generator state). Blurs use reflect-101 borders (torch's 'reflect' pad + correlation),
resizes follow torch semantics (`data_pipeline.resize`), JPEG is DiffJPEG (`data_pipeline.diffjpeg`).
`degrade` never flips: flipping is GT preparation's job.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import scipy.fft as sfft

from data_pipeline import kernels, noise
from data_pipeline.diffjpeg import diff_jpeg
from data_pipeline.presets import PASD, RESIZE_MODES, DegradationConfig, StageConfig
from data_pipeline.resize import resize_by, resize_to


def blur(img: np.ndarray, kernel: kernels.Kernel) -> np.ndarray:
    """Correlation with reflect-101 borders, the CPU equivalent of basicsr's `filter2D`.

    Isotropic Gaussians go through `sepFilter2D`; small kernels through `cv2.filter2D` (direct); kernels
    of 13 taps or more through our own float32 FFT, which is about 2x faster than cv2's DFT path.
    """
    if kernel.is_identity:
        return img
    if kernel.separable is not None:
        g = kernel.separable
        return cv2.sepFilter2D(img, -1, g, g, borderType=cv2.BORDER_REFLECT_101)
    if kernel.k2d.shape[0] <= DIRECT_MAX_TAPS:
        return cv2.filter2D(img, -1, kernel.k2d, borderType=cv2.BORDER_REFLECT_101)
    return fft_correlate(img, kernel.k2d)


DIRECT_MAX_TAPS = 11  # cv2.filter2D switches to its slower DFT path above this


def fft_correlate(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """2-D correlation of HxWxC float32 `img` with an odd square `k`, reflect-101 borders, via rfft2."""
    h, w, _ = img.shape
    n = k.shape[0]
    p = n // 2
    xp = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_REFLECT_101)
    lh, lw = sfft.next_fast_len(h + 2 * p, real=True), sfft.next_fast_len(w + 2 * p, real=True)
    fx = sfft.rfft2(xp, s=(lh, lw), axes=(0, 1), workers=1)
    fk = sfft.rfft2(k[::-1, ::-1], s=(lh, lw), workers=1)  # correlation == convolution with the flipped kernel
    fx *= fk[:, :, None]
    y = sfft.irfft2(fx, s=(lh, lw), axes=(0, 1), workers=1)
    # full convolution index n-1+i holds output pixel i; indices >= n-1 and < h+2p never wrap around
    return np.ascontiguousarray(y[n - 1:n - 1 + h, n - 1:n - 1 + w], dtype=np.float32)


def _mode(rng: np.random.Generator) -> str:
    return RESIZE_MODES[rng.integers(len(RESIZE_MODES))]


def _scale(rng: np.random.Generator, st: StageConfig) -> float:
    kind = rng.choice(3, p=np.asarray(st.resize_probs) / np.sum(st.resize_probs))
    if kind == 0:
        return float(rng.uniform(1.0, st.resize_range[1]))
    if kind == 1:
        return float(rng.uniform(st.resize_range[0], 1.0))
    return 1.0


def _noise(rng: np.random.Generator, bulk: np.random.Generator, img: np.ndarray, st: StageConfig) -> np.ndarray:
    if rng.random() < st.gaussian_noise_prob:
        sigma = rng.uniform(*st.noise_range)
        gray = rng.random() < st.gray_noise_prob
        return noise.add_noise(img, noise.gaussian_noise(bulk, img.shape, sigma, gray))
    scale = rng.uniform(*st.poisson_scale_range)
    gray = rng.random() < st.gray_noise_prob
    return noise.add_noise(img, noise.poisson_noise(bulk, img, scale, gray))


def bulk_generator(rng: np.random.Generator) -> np.random.Generator:
    """A fast SFC64 generator keyed by one draw of `rng`, for the per-pixel noise fields.

    Grain hands each element a Philox generator, whose raw uniforms cost about 3x SFC64's; the noise
    fields take a million draws per image. Still a pure function of the element's seed.
    """
    return np.random.Generator(np.random.SFC64(int(rng.integers(2**63))))


def _jpeg(rng: np.random.Generator, img: np.ndarray, st: StageConfig) -> np.ndarray:
    quality = rng.uniform(*st.jpeg_range)
    np.clip(img, 0.0, 1.0, out=img)
    return diff_jpeg(img, quality)


def degrade_float(img: np.ndarray, rng: np.random.Generator, cfg: DegradationConfig = PASD) -> np.ndarray:
    """Degrades an HxWx3 float32 RGB image in [0, 1]; returns the unrounded LQ (H x W if resize_back)."""
    h, w, _ = img.shape
    s1, s2 = cfg.stage1, cfg.stage2
    # All three kernels are drawn up front, as the original does, even when one goes unused.
    k1 = kernels.sample_blur_kernel(rng, s1.kernel)
    k2 = kernels.sample_blur_kernel(rng, s2.kernel)
    sinc = kernels.sample_final_sinc(rng, cfg.final_sinc_prob, cfg.final_sinc_sizes)
    bulk = bulk_generator(rng)

    # stage 1
    out = blur(img, k1) if rng.random() < s1.blur_prob else img
    out = resize_by(out, _scale(rng, s1), _mode(rng))
    out = _noise(rng, bulk, out, s1)
    out = _jpeg(rng, out, s1)

    # stage 2
    if rng.random() < s2.blur_prob:
        out = blur(out, k2)
    s = _scale(rng, s2)
    out = resize_to(out, int(h / cfg.scale * s), int(w / cfg.scale * s), _mode(rng))
    out = _noise(rng, bulk, out, s2)
    lh, lw = h // cfg.scale, w // cfg.scale
    if rng.random() < 0.5:
        out = blur(resize_to(out, lh, lw, _mode(rng)), sinc)
        out = _jpeg(rng, out, s2)
    else:
        out = _jpeg(rng, out, s2)
        out = blur(resize_to(out, lh, lw, _mode(rng)), sinc)

    if cfg.resize_back:
        out = resize_to(out, h, w, _mode(rng))
    return out


def quantise(img: np.ndarray) -> np.ndarray:
    """clamp(round(255 x), 0, 255) as uint8: the final 8-bit rounding (half to even, like torch.round)."""
    # cv2's saturating convert rounds half to even like np.rint; max() first so negatives clamp to 0
    return cv2.convertScaleAbs(cv2.max(img, 0.0), alpha=255.0)


def as_config(cfg: DegradationConfig | Mapping[str, Any] | None) -> DegradationConfig:
    return PASD if cfg is None else DegradationConfig.from_dict(cfg)


def degrade_uint8(hq: np.ndarray, rng: np.random.Generator,
                  cfg: DegradationConfig | Mapping | None = None) -> np.ndarray:
    """The loader's entry: HxWx3 uint8 RGB GT -> HxWx3 uint8 LQ, all randomness from `rng`."""
    if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"hq must be an HxWx3 uint8 RGB array, got {hq.dtype} {hq.shape}")
    img = hq.astype(np.float32) / np.float32(255.0)
    return quantise(degrade_float(img, rng, as_config(cfg)))


def degrade(hq: np.ndarray, seed: int, cfg: DegradationConfig | Mapping | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB GT crop -> HxWx3 float32 LQ in [0, 1] on 8-bit levels (PASD preset when cfg is None).

    Deterministic in (hq, seed): the generator is Philox keyed by `seed`, nothing global is touched.
    """
    rng = np.random.Generator(np.random.Philox(seed))
    return degrade_uint8(hq, rng, cfg).astype(np.float32) / np.float32(255.0)
