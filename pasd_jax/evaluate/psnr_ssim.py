"""PSNR and SSIM with the Real-ISR conventions: optional Y channel and a cropped border.

These are the definitions basicsr 1.4.2's `calculate_psnr` / `calculate_ssim` use (and with them most Real-ISR
tables): PSNR over all values with peak 255; SSIM of Wang et al. with an 11x11 Gaussian window (sigma 1.5) over the
'valid' region, averaged over channels. Inputs are uint8 RGB [H, W, 3]; the crop removes `crop_border` pixels from
every edge before anything else.

The arithmetic itself (float64) is `pasd_jax.image_ops.psnr` / `ssim`, one implementation for the whole project,
kept on the utility floor so that code below `evaluate` can use it; this module adds the conventions and the
user-facing errors.
"""
from __future__ import annotations

import numpy as np

from pasd_jax import image_ops
from pasd_jax.evaluate.color import rgb_to_y
from pasd_jax.evaluate.errors import MetricInputError

SSIM_WINDOW = image_ops.SSIM_WINDOW


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
        return rgb_to_y(pred).astype(np.float64), rgb_to_y(gt).astype(np.float64)
    return pred.astype(np.float64), gt.astype(np.float64)


def psnr(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB (peak 255); inf for identical images."""
    return image_ops.psnr(*_prepare(pred, gt, crop_border, y_channel))


def ssim(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM in [-1, 1], the mean over channels (one channel for Y)."""
    a, b = _prepare(pred, gt, crop_border, y_channel)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise MetricInputError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after --crop-border, "
                               f"got {a.shape[1]}x{a.shape[0]}")
    return image_ops.ssim(a, b)
