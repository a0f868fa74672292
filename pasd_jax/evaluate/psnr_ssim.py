"""PSNR and SSIM with the Real-ISR conventions: optional Y channel and a cropped border (numpy, float64).

These are the definitions basicsr 1.4.2's `calculate_psnr` / `calculate_ssim` use (and with them most Real-ISR
tables): PSNR over all values with peak 255; SSIM of Wang et al. with an 11x11 Gaussian window (sigma 1.5) over the
'valid' region, averaged over channels. Inputs are uint8 RGB [H, W, 3]; the crop removes `crop_border` pixels from
every edge before anything else.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from pasd_jax.evaluate.color import rgb_to_y
from pasd_jax.evaluate.errors import MetricInputError

SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    """`img` without `border` pixels on each side."""
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return img
    h, w = img.shape[:2]
    if h <= 2 * border or w <= 2 * border:
        raise MetricInputError(f"a {w}x{h} image has nothing left after cropping {border} pixels from each edge; "
                               "lower --crop-border")
    return img[border:h - border, border:w - border]


def _prepare(pred: np.ndarray, gt: np.ndarray, border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise MetricInputError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    pred, gt = crop_border(pred, border), crop_border(gt, border)
    if y_channel:
        return rgb_to_y(pred)[..., None].astype(np.float64), rgb_to_y(gt)[..., None].astype(np.float64)
    pred, gt = pred.astype(np.float64), gt.astype(np.float64)
    return (pred[..., None], gt[..., None]) if pred.ndim == 2 else (pred, gt)


def psnr(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB (peak 255); inf for identical images."""
    a, b = _prepare(pred, gt, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 * 255.0 / mse))


def _gaussian_1d() -> np.ndarray:
    x = np.arange(SSIM_WINDOW, dtype=np.float64) - (SSIM_WINDOW - 1) / 2
    g = np.exp(-x * x / (2 * _SSIM_SIGMA ** 2))
    return g / g.sum()


def _blur_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian filtering of [H, W] keeping only positions where the window lies inside the image."""
    r = SSIM_WINDOW // 2
    out = ndimage.correlate1d(ndimage.correlate1d(x, g, axis=0, mode="nearest"), g, axis=1, mode="nearest")
    return out[r:-r, r:-r]


def _ssim_plane(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    mx, my = _blur_valid(x, g), _blur_valid(y, g)
    sxx = _blur_valid(x * x, g) - mx * mx
    syy = _blur_valid(y * y, g) - my * my
    sxy = _blur_valid(x * y, g) - mx * my
    ssim_map = ((2 * mx * my + _C1) * (2 * sxy + _C2)) / ((mx * mx + my * my + _C1) * (sxx + syy + _C2))
    return float(ssim_map.mean())


def ssim(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM in [-1, 1], the mean over channels (one channel for Y)."""
    a, b = _prepare(pred, gt, crop_border, y_channel)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise MetricInputError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after --crop-border, "
                               f"got {a.shape[1]}x{a.shape[0]}")
    g = _gaussian_1d()
    return float(np.mean([_ssim_plane(a[..., c], b[..., c], g) for c in range(a.shape[-1])]))
