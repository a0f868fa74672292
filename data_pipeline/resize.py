"""Resizing with torch `F.interpolate` semantics (align_corners=False, no antialiasing) on HxWxC float32.

Why not plain cv2: torch 'area' is `adaptive_avg_pool2d` (equal-weight mean over [floor(i*In/Out),
ceil((i+1)*In/Out))), which differs from cv2.INTER_AREA's fractional weights for non-integer ratios; and a
torch call with `scale_factor=s` outputs floor(In*s) pixels but maps coordinates with 1/s, where cv2's
`dsize` form maps with In/Out. bilinear/bicubic (A = -0.75, edge clamping) otherwise agree with cv2.
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np
from scipy import sparse

_CV2_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


@functools.lru_cache(maxsize=1024)
def area_matrix(n_in: int, n_out: int) -> sparse.csr_matrix:
    """The (n_out, n_in) averaging operator of torch's adaptive average pooling along one axis."""
    i = np.arange(n_out)
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
    length = end - start
    indptr = np.concatenate([[0], np.cumsum(length)])
    cols = np.arange(indptr[-1]) - np.repeat(indptr[:-1] - start, length)  # start .. end-1 per row
    vals = np.repeat((1.0 / length).astype(np.float32), length)
    return sparse.csr_matrix((vals, cols, indptr), shape=(n_out, n_in), dtype=np.float32)


def _area(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w, c = img.shape
    if h % out_h == 0 and w % out_w == 0:  # integer down-scale: block means, where cv2's area is the same
        return _as3(cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA), c)
    if out_h % h == 0 and out_w % w == 0:  # integer up-scale: pure replication
        return np.repeat(np.repeat(img, out_h // h, axis=0), out_w // w, axis=1)
    # one sparse pass per axis; cv2.transpose (fast for interleaved channels) brings W to the front
    rows = (area_matrix(h, out_h) @ img.reshape(h, w * c)).reshape(out_h, w, c)
    cols = cv2.transpose(_as3(rows, c) if c > 1 else rows)  # (w, out_h, c)
    cols = (area_matrix(w, out_w) @ cols.reshape(w, out_h * c)).reshape(out_w, out_h, c)
    return _as3(cv2.transpose(cols), c).astype(np.float32, copy=False)


def _as3(x: np.ndarray, c: int) -> np.ndarray:
    return x[:, :, None] if x.ndim == 2 and c == 1 else x


def resize_to(img: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    """`F.interpolate(x, size=(out_h, out_w), mode=mode)`: coordinates mapped with In/Out."""
    h, w, c = img.shape
    if (out_h, out_w) == (h, w):
        return img
    if mode == "area":
        return _area(img, out_h, out_w)
    out = cv2.resize(img, (out_w, out_h), interpolation=_CV2_INTERP[mode])
    return _as3(out, c)


def resize_by(img: np.ndarray, scale: float, mode: str) -> np.ndarray:
    """`F.interpolate(x, scale_factor=scale, mode=mode)`: floor(In*scale) pixels, coordinates mapped with 1/scale."""
    h, w, c = img.shape
    out_h, out_w = math.floor(h * scale), math.floor(w * scale)
    if scale == 1.0:
        return img
    if mode == "area":  # torch's area ignores the scale beyond the output size
        return _area(img, out_h, out_w)
    # cv2 uses fx/fy for the coordinate map only when dsize is empty; it then outputs round(In*scale)
    # pixels, which is floor(In*scale) or one more: crop the extra row/column.
    out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=_CV2_INTERP[mode])
    out = _as3(out, c)
    if out.shape[0] < out_h or out.shape[1] < out_w:  # cannot happen for round >= floor; guard anyway
        raise AssertionError(f"cv2 produced {out.shape[:2]} for {(out_h, out_w)}")
    return np.ascontiguousarray(out[:out_h, :out_w])
