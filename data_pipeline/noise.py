"""Gaussian and Poisson noise of the Real-ESRGAN degradation, on HxWx3 float32 RGB in [0, 1].

Both come in colour (independent per channel) and grey (one field added to all three channels) forms.
Poisson follows basicsr's `generate_poisson_noise_pt`: quantise to 8-bit levels, v = 2^ceil(log2(#levels)),
noise = Poisson(v * x_q) / v - x_q, scaled and added to the *unquantised* image. The Poisson draw is an exact
inverse-CDF lookup: v * x_q takes at most 256 values (level/255 * v), so per-level CDF tables (float64, cut
where the CDF reaches 1.0 in float64) turn uniforms into counts about 4x faster than `Generator.poisson`.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
from scipy import stats

# torchvision's rgb_to_grayscale weights, applied to RGB (not cv2's BGR2GRAY order).
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)


def to_gray(img: np.ndarray) -> np.ndarray:
    """HxWx3 RGB -> HxW luma with torchvision weights, float32."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, gray: bool) -> np.ndarray:
    """N(0, sigma/255) noise; grey noise is one HxWx1 field broadcast over the channels."""
    h, w, c = shape
    noise = rng.standard_normal((h, w, 1 if gray else c), dtype=np.float32)
    noise *= np.float32(sigma / 255.0)
    return noise


def _levels(x: np.ndarray) -> np.ndarray:
    """clamp(round(255 x), 0, 255) as uint8 (round half to even, like torch.round)."""
    return cv2.convertScaleAbs(cv2.max(x, 0.0), alpha=255.0).reshape(x.shape)  # saturating, half to even


def poisson_vals(levels: np.ndarray) -> int:
    """2^ceil(log2(number of distinct 8-bit levels)), basicsr's normaliser."""
    n = int(np.count_nonzero(np.bincount(levels.ravel(), minlength=256)))
    return int(2 ** np.ceil(np.log2(n)))


class _PoissonTable:
    """Inverse-CDF sampler for Poisson(v * l / 255), l = 0..255, driven by one float64 uniform per pixel.

    A guide table splits [0, 1) into G buckets per level: when the count is the same at both ends of a bucket,
    every u inside it maps to that count (the usual case); otherwise the walk up the CDF starts there.
    """

    GUIDE_BITS = 10

    def __init__(self, vals: int):
        lam = vals * np.arange(256, dtype=np.float64) / 255.0
        kmax = int(np.max(lam) + 12 * np.sqrt(np.max(lam)) + 30)
        cdf = stats.poisson.cdf(np.arange(kmax + 1, dtype=np.float64)[None, :], lam[:, None])  # (256, kmax+1)
        cdf[:, -1] = 1.0  # the cut tail is below float64 resolution (checked in tests)
        self.width = kmax + 1
        self.cdf = np.ascontiguousarray(cdf.ravel())
        n = 1 << self.GUIDE_BITS
        edges = np.arange(n + 1, dtype=np.float64) / n
        # first k with cdf[l, k] > u, at both ends of each bucket [j/n, (j+1)/n)
        lo = np.stack([np.searchsorted(cdf[lv], edges[:-1], side="right") for lv in range(256)])
        hi = np.stack([np.searchsorted(cdf[lv], edges[1:], side="left") for lv in range(256)])
        # exact bucket: every u < (j+1)/n has cdf[l, lo] > u (cdf[lo] >= (j+1)/n) -> count is lo
        exact = hi <= lo
        self.guide = np.where(exact, lo, -(lo + 1)).astype(np.int16).ravel()

    def sample(self, rng: np.random.Generator, levels: np.ndarray) -> np.ndarray:
        """Poisson counts for each 8-bit level in `levels` (any shape), as float32.

        u = (raw >> 11) / 2^53 is how numpy turns 64 raw bits into a double, so the bucket floor(u * 2^10)
        is raw >> 54 and the double is only formed for the few pixels that walk.
        """
        raw = rng.bit_generator.random_raw(levels.size)
        gi = (raw >> np.uint64(64 - self.GUIDE_BITS)).astype(np.uint32)
        gi |= levels.reshape(-1).astype(np.uint32) << np.uint32(self.GUIDE_BITS)
        k = self.guide[gi]
        todo = np.flatnonzero(k < 0)
        if todo.size:
            uu = (raw[todo] >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
            base = levels.reshape(-1)[todo].astype(np.int64) * self.width
            idx = base - k[todo].astype(np.int64) - 1  # the walk's start in the flat CDF table
            live = np.flatnonzero(self.cdf[idx] <= uu)
            while live.size:  # smallest k with u < cdf[k]; cdf ends at 1.0 > u
                idx[live] += 1
                live = live[self.cdf[idx[live]] <= uu[live]]
            k[todo] = idx - base
        return k.astype(np.float32).reshape(levels.shape)


@functools.lru_cache(maxsize=16)
def poisson_table(vals: int) -> _PoissonTable:
    return _PoissonTable(vals)


def poisson_noise(rng: np.random.Generator, img: np.ndarray, scale: float, gray: bool) -> np.ndarray:
    """Shot noise for `img` (HxWx3 float32); grey noise is computed on the luma and returned as HxWx1."""
    src = to_gray(img)[:, :, None] if gray else img
    levels = _levels(src)
    vals = poisson_vals(levels)
    counts = poisson_table(vals).sample(rng, levels)
    xq = levels.astype(np.float32) / np.float32(255.0)
    noise = counts / np.float32(vals) - xq
    noise *= np.float32(scale)
    return noise


def add_noise(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """img + noise (broadcasting grey noise), clipped to [0, 1], not rounded."""
    out = img + noise
    np.clip(out, 0.0, 1.0, out=out)
    return out
