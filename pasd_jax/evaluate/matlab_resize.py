"""MATLAB's `imresize` (bicubic, antialiased when shrinking) of a 2-D float32 image, as NIQE's second scale needs.

MATLAB widens the cubic kernel by 1/scale when downsampling (antialiasing) and mirrors the image at its edges
('symmetric': the edge pixel repeats). Each output pixel is a short weighted sum of input taps (memory stays
proportional to the image).

Bit-level order. NIQE fits each block by a grid search, so a last-bit difference in the resized image can move a
fit by one grid step; on images with few blocks that shifts NIQE by ~1e-3. The values Real-ISR papers quote come
from basicsr, which resizes in float32 with torch (MKL's gemv on x86), so we add in the order it does: the height
pass sums its taps left to right; the width pass, for 8 taps (the 1/2 resize NIQE uses), sums in the order MKL's
kernel uses for the memory alignment the padded row would have there (measured against torch 2.13 / MKL 2024.2:
bit-identical for every side that is a multiple of 96, the sizes NIQE resizes; other sizes within 1 ulp).
"""
from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), support [-2, 2]."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return (near + far).astype(np.float32)


def _taps(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(indices [out, taps] into the input, mirrored at the edges; weights [out, taps] summing to one; each first
    tap's position in the edge-padded row and that row's length, which decide the addition order)."""
    width = 4.0 / scale if (scale < 1 and antialias) else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float32)
    centre = x / np.float32(scale) + np.float32(0.5 * (1 - 1 / scale))  # output pixel centre in input coordinates
    left = np.floor(centre - np.float32(width / 2))
    idx = left[:, None] + np.arange(math.ceil(width) + 2, dtype=np.float32)[None, :]
    dist = centre[:, None] - idx
    w = np.float32(scale) * _cubic(dist * np.float32(scale)) if (scale < 1 and antialias) else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    keep = slice(1 if not w[:, 0].any() else 0, -1 if not w[:, -1].any() else None)  # drop all-zero end taps
    idx, w = idx[:, keep].astype(np.int64), w[:, keep]
    pad_start, pad_end = 1 - int(idx.min()), int(idx.max()) - in_len
    j = idx - 1  # 0-based
    j = np.where(j < 0, -j - 1, j)
    j = np.where(j >= in_len, 2 * in_len - 1 - j, j)
    if j.min() < 0 or j.max() >= in_len:
        raise ValueError(f"image side {in_len} is too short for a bicubic resize by {scale}")
    return j, w.astype(np.float32), idx[:, 0] - 1 + pad_start, in_len + pad_start + pad_end


def _resize_axis0(img: np.ndarray, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    """Resize along axis 0, each output the left-to-right sum over its taps."""
    j, w, _, _ = _taps(img.shape[0], out_len, scale, antialias)
    out = w[:, 0, None] * img[j[:, 0]]
    for t in range(1, j.shape[1]):
        out += w[:, t, None] * img[j[:, t]]
    return out


def _mkl_order_sum(p: list[np.ndarray], align: int) -> np.ndarray:
    """Sum of 8 terms in MKL's order for a row starting at `align` (mod 4) floats: left to right, except that term
    5 - align is held back and added together with the term two places after it."""
    held = 5 - align
    s = p[0]
    for k in range(1, held):
        s = s + p[k]
    s = s + p[held + 1]
    s = s + (p[held] + p[held + 2])
    for k in range(held + 3, 8):
        s = s + p[k]
    return s


def _resize_axis1(img: np.ndarray, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    """Resize along axis 1 of [H, W]; 8-tap sums in MKL's order for the padded row layout, others left to right."""
    j, w, start, padded_len = _taps(img.shape[1], out_len, scale, antialias)
    if j.shape[1] != 8:
        return np.ascontiguousarray(_resize_axis0(img.T, out_len, scale, antialias).T)
    out = np.empty((img.shape[0], out_len), np.float32)
    align = (start - padded_len) % 4
    for a in range(4):
        cols = np.flatnonzero(align == a)
        if len(cols):
            out[:, cols] = _mkl_order_sum([w[cols, t] * img[:, j[cols, t]] for t in range(8)], a)
    return out


def imresize_matlab(img: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """float32 [ceil(H * scale), ceil(W * scale)] bicubic resize of a float32 [H, W] image."""
    img = np.asarray(img, np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    out_h, out_w = math.ceil(img.shape[0] * scale), math.ceil(img.shape[1] * scale)
    return _resize_axis1(_resize_axis0(img, out_h, scale, antialias), out_w, scale, antialias)
