"""The JPEG simulation PASD trains with (basicsr's DiffJPEG, non-differentiable rounding) in numpy.

It is not libjpeg, and the differences shape the training distribution, so they are kept:
- continuous quality: table factor (200 - 2q)/100 for q >= 50 (5000/q/100 below), tables neither rounded
  nor clamped to >= 1;
- zero (black) padding to a multiple of 16 at the bottom/right, cropped after decoding;
- 4:2:0 chroma by 2x2 means, decoded by nearest-neighbour replication;
- float DCT with no 8-bit rounding of the input or output (only the coefficients are rounded, half to even);
- the standard quantisation tables stored transposed relative to the block orientation;
- JFIF full-range YCbCr on RGB input.
The DCT is orthonormal; an 8x8 block transform is one 64x64 GEMM over flattened blocks, with the
quantisation step folded into the matrices.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

_STD_LUMA = np.array(
    [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
     [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
     [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float64)
_STD_CHROMA = np.full((8, 8), 99.0)
_STD_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
# The tables as DiffJPEG applies them: transposed w.r.t. (vertical, horizontal) frequency.
LUMA_TABLE = _STD_LUMA.T.copy()
CHROMA_TABLE = _STD_CHROMA.T.copy()

_RGB2YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC2RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


# Row chunk of the block GEMMs. OpenBLAS gives (slightly) different float results with different thread
# counts, and rounding the DCT coefficients turns that into different pixels (about one image in six differed
# between a 1-thread worker and a 2-thread main process). It never threads a GEMM with m*n*k below 4 * 65536,
# so 32 x 64 x 64 products, stacked in one matmul call, run single-threaded wherever `degrade` is called:
# results are then a pure function of the seed, with no global thread setting touched.
GEMM_ROWS = 32


def _gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for a tall float32 `a` (n x 64) and a 64 x 64 `b`, as single-threaded 32-row products."""
    n = a.shape[0]
    m = n - n % GEMM_ROWS
    out = np.empty((n, b.shape[1]), np.float32)
    if m:
        np.matmul(a[:m].reshape(-1, GEMM_ROWS, a.shape[1]), b, out=out[:m].reshape(-1, GEMM_ROWS, b.shape[1]))
    if m < n:
        np.matmul(a[m:], b, out=out[m:])
    return out


def quality_to_factor(quality: float) -> float:
    """Quantisation-table multiplier for a (continuous) JPEG quality; q >= 100 would divide by zero."""
    if not 0.0 < quality < 100.0:
        raise ValueError(f"DiffJPEG quality must be in (0, 100), got {quality}")
    q = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return q / 100.0


@functools.lru_cache(maxsize=1)
def dct_matrix() -> np.ndarray:
    """Orthonormal 8-point DCT-II matrix D (rows = frequencies): coefficients = D @ block @ D.T."""
    n = np.arange(8)
    d = np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16) * 0.5
    d[0] *= 1.0 / np.sqrt(2.0)
    return d


@functools.lru_cache(maxsize=1)
def _block_dct64() -> np.ndarray:
    """T (64x64) with flat(D @ B @ D.T) = flat(B) @ T for row-major flattened 8x8 blocks."""
    d = dct_matrix()
    return np.kron(d, d).T


def _quantise_blocks(plane: np.ndarray, table: np.ndarray, factor: float) -> np.ndarray:
    """DCT, quantise, dequantise and inverse-DCT every 8x8 block of a (H, W) plane (H, W multiples of 8)."""
    h, w = plane.shape
    blocks = plane.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 64)
    t = _block_dct64()
    q = (table * factor).ravel()
    fwd = (t / q[None, :]).astype(np.float32)  # coefficients / step
    inv = (q[:, None] * t.T).astype(np.float32)  # step * coefficients -> pixels
    coef = _gemm(blocks, fwd)
    np.rint(coef, out=coef)
    out = _gemm(coef, inv)
    return out.reshape(h // 8, w // 8, 8, 8).transpose(0, 2, 1, 3).reshape(h, w)


def diff_jpeg(img: np.ndarray, quality: float) -> np.ndarray:
    """JPEG-compresses an HxWx3 float32 RGB image in [0, 1]; returns float32 in [0, 1], same size."""
    h, w, _ = img.shape
    factor = quality_to_factor(float(quality))
    ph, pw = -h % 16, -w % 16
    x = img if (ph == 0 and pw == 0) else cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
    H, W = x.shape[:2]
    # to YCbCr on the 0-255 scale, luma centred (chroma's +128 and the DCT's -128 cancel)
    ycc_m = np.zeros((3, 4), np.float32)
    ycc_m[:, :3] = 255.0 * _RGB2YCC
    ycc_m[0, 3] = -128.0
    y, cb, cr = cv2.split(cv2.transform(x, ycc_m))
    cb = cv2.resize(cb, (W // 2, H // 2), interpolation=cv2.INTER_AREA)  # exact 2x2 means
    cr = cv2.resize(cr, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    y = _quantise_blocks(y, LUMA_TABLE, factor)
    cb = _quantise_blocks(cb, CHROMA_TABLE, factor)
    cr = _quantise_blocks(cr, CHROMA_TABLE, factor)
    cb = cv2.resize(cb, (W, H), interpolation=cv2.INTER_NEAREST)  # exact 2x replication
    cr = cv2.resize(cr, (W, H), interpolation=cv2.INTER_NEAREST)
    # back to RGB in [0, 1]: (luma + 128 + chroma terms) / 255
    rgb_m = np.zeros((3, 4), np.float32)
    rgb_m[:, :3] = _YCC2RGB / 255.0
    rgb_m[:, 3] = 128.0 / 255.0
    out = cv2.transform(cv2.merge([y, cb, cr]), rgb_m)
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out[:h, :w]) if (ph or pw) else out
