"""NIQE (Mittal et al., "Making a 'Completely Blind' Image Quality Analyzer", 2013) in numpy; lower is better.

The image's Y channel (rounded, as the MATLAB release works on 8-bit data) is split into 96x96 blocks, and at a
second scale (MATLAB bicubic half size) into 48x48 blocks. Each block gives 18 features per scale: the shape and
spread of its locally normalised (MSCN) coefficients and of the products of neighbouring coefficients in four
directions, each fitted with an asymmetric generalised Gaussian. NIQE is the distance between the Gaussian fitted
to those features and the pristine model shipped in `pasd_jax/assets/niqe` (see the README there).

Precision follows basicsr 1.4.2's `calculate_niqe` (float32 image and statistics, float64 fits), which is what
Real-ISR tables quote; the fit itself is a search over the same 0.001-spaced grid of shape parameters.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib
import warnings

import numpy as np
from scipy import ndimage, special

from pasd_jax.evaluate.color import rgb_to_y
from pasd_jax.evaluate.errors import MetricInputError
from pasd_jax.evaluate.matlab_resize import imresize_matlab
from pasd_jax.evaluate.psnr_ssim import crop_border as _crop

BLOCK = 96
PARAMS_FILE = pathlib.Path(__file__).resolve().parents[1] / "assets" / "niqe" / "niqe_pris_params.npz"
PARAMS_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical, main and anti diagonal


@functools.lru_cache(maxsize=1)
def pristine_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [1, 36], covariance [36, 36], 7x7 Gaussian window) of the pristine-image model."""
    try:
        data = PARAMS_FILE.read_bytes()
    except OSError as e:
        raise MetricInputError(f"NIQE parameters {PARAMS_FILE} are missing ({e}); reinstall pasd-jax") from None
    if hashlib.sha256(data).hexdigest() != PARAMS_SHA256:
        raise MetricInputError(f"NIQE parameters {PARAMS_FILE} are damaged (checksum differs); reinstall pasd-jax")
    with np.load(PARAMS_FILE) as npz:
        return npz["mu_pris_param"], npz["cov_pris_param"], npz["gaussian_window"]


@functools.lru_cache(maxsize=1)
def _shape_grid() -> tuple[np.ndarray, np.ndarray]:
    """Candidate AGGD shapes and the moment ratio Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) of each."""
    shapes = np.arange(0.2, 10.001, 0.001)
    inv = 1.0 / shapes
    ratio = special.gamma(2 * inv) ** 2 / (special.gamma(inv) * special.gamma(3 * inv))
    return shapes, ratio


def _fit_aggd(x: np.ndarray) -> tuple[float, float, float]:
    """(shape, left scale, right scale) of an asymmetric generalised Gaussian, by moment matching."""
    x = x.ravel()
    left_std = np.sqrt(np.mean(x[x < 0] ** 2))
    right_std = np.sqrt(np.mean(x[x > 0] ** 2))
    g = left_std / right_std
    r = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2)
    r_norm = (r * (g ** 3 + 1) * (g + 1)) / ((g ** 2 + 1) ** 2)
    shapes, ratio = _shape_grid()
    a = shapes[np.argmin((ratio - r_norm) ** 2)]
    spread = np.sqrt(special.gamma(1 / a) / special.gamma(3 / a))
    return a, left_std * spread, right_std * spread


def _block_features(block: np.ndarray) -> list[float]:
    a, left, right = _fit_aggd(block)
    feats = [a, (left + right) / 2]
    for shift in _NEIGHBOURS:
        a, left, right = _fit_aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = (right - left) * (special.gamma(2 / a) / special.gamma(1 / a))
        feats += [a, mean, left, right]
    return feats


def _mscn(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Mean-subtracted, contrast-normalised coefficients (local Gaussian statistics, edges replicated)."""
    mu = ndimage.convolve(img, window, mode="nearest")
    var = ndimage.convolve(np.square(img), window, mode="nearest") - np.square(mu)
    return (img - mu) / (np.sqrt(np.abs(var)) + 1)


def niqe_of_y(y: np.ndarray) -> float:
    """NIQE of a Y (or gray) image on the 0..255 scale, [H, W]."""
    y = np.asarray(y, np.float32)
    h, w = y.shape
    nh, nw = h // BLOCK, w // BLOCK
    if nh * nw < 2:
        raise MetricInputError(
            f"NIQE needs at least two {BLOCK}x{BLOCK} blocks, i.e. an image of at least {2 * BLOCK}x{BLOCK} or "
            f"{BLOCK}x{2 * BLOCK} pixels (after --crop-border); got {w}x{h}")
    mu_pris, cov_pris, window = pristine_params()
    img = np.round(y)[:nh * BLOCK, :nw * BLOCK]
    per_scale = []
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # blocks without negative (or positive) values give NaN
        for scale in (1, 2):
            coeffs = _mscn(img, window)
            b = BLOCK // scale
            per_scale.append(np.array([_block_features(coeffs[i * b:(i + 1) * b, j * b:(j + 1) * b])
                                       for j in range(nw) for i in range(nh)]))
            if scale == 1:
                img = imresize_matlab(img / np.float32(255.0), 0.5) * np.float32(255.0)
        feats = np.concatenate(per_scale, axis=1)
        mu = np.nanmean(feats, axis=0)
    complete = feats[~np.isnan(feats).any(axis=1)]
    if len(complete) < 2:
        raise MetricInputError(f"NIQE: fewer than two {BLOCK}x{BLOCK} blocks have usable statistics "
                               f"(an almost flat {w}x{h} image?); NIQE is undefined for it")
    cov = np.cov(complete, rowvar=False)
    diff = mu_pris - mu
    quality = diff @ np.linalg.pinv((cov_pris + cov) / 2) @ diff.T
    return float(np.sqrt(np.squeeze(quality)))


def niqe(rgb: np.ndarray, crop_border: int = 0) -> float:
    """NIQE of a uint8 [H, W, 3] RGB image on its Y channel, after removing `crop_border` pixels per edge."""
    return niqe_of_y(_crop(rgb_to_y(np.asarray(rgb)), crop_border))
