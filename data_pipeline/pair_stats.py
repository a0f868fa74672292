"""Per-pair statistics of (GT, LQ) used to compare degradation implementations by distribution.

The five numbers summarise what the degradation does to a crop: fidelity (PSNR), blur/aliasing
(Laplacian-variance ratio), noise (median Immerkaer response of the LQ at its 128 px native grid), colour
(chroma error at the native grid) and JPEG blocking (gradient ratio across 8 px block boundaries at the
native grid). They only need numpy and OpenCV, so the same code scores the official torch pipeline (in a
separate environment, `tools/degradation_stats`) and ours (in the tests).
"""
from __future__ import annotations

import pathlib

import cv2
import numpy as np
from PIL import Image

from data_pipeline.gt_prep import prepare_gt

# Bump when a definition below changes: recorded reference statistics are only comparable at equal versions.
STATS_VERSION = 2
STAT_NAMES = ("psnr", "sharpness_ratio", "noise_residual", "colour_shift", "blockiness")
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_RGB2YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)


def _native(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (w // scale, h // scale), interpolation=cv2.INTER_AREA)


def _block_ratio(y: np.ndarray, block: int = 8) -> float:
    dx = np.abs(np.diff(y, axis=1))
    dy = np.abs(np.diff(y, axis=0))
    at_x = (np.arange(dx.shape[1]) + 1) % block == 0
    at_y = (np.arange(dy.shape[0]) + 1) % block == 0
    edge = dx[:, at_x].mean() + dy[at_y, :].mean()
    inner = dx[:, ~at_x].mean() + dy[~at_y, :].mean()
    return float(edge / max(inner, 1e-12))


def pair_stats(gt: np.ndarray, lq: np.ndarray, scale: int = 4) -> dict[str, float]:
    """Statistics of one pair of HxWx3 uint8 RGB images (GT and its degraded LQ at the same size)."""
    g = gt.astype(np.float32) / 255.0
    q = lq.astype(np.float32) / 255.0
    mse = float(np.mean((g - q) ** 2))
    psnr = 10.0 * np.log10(1.0 / max(mse, 1e-12))
    gy = cv2.cvtColor(g, cv2.COLOR_RGB2GRAY)
    ly = cv2.cvtColor(q, cv2.COLOR_RGB2GRAY)
    sharp = float(cv2.Laplacian(ly, cv2.CV_32F).var() / max(cv2.Laplacian(gy, cv2.CV_32F).var(), 1e-12))
    ln, gn = _native(q, scale), _native(g, scale)
    lny = cv2.cvtColor(ln, cv2.COLOR_RGB2GRAY)
    # median |Immerkaer response| over R, G, B: robust to edges, sees colour and grey noise alike
    resp = cv2.filter2D(ln, -1, _IMMERKAER, borderType=cv2.BORDER_REFLECT_101)[1:-1, 1:-1]
    noise = float(np.sqrt(np.pi / 2.0) / 6.0 * np.median(np.abs(resp)) * 255.0)
    chroma = (cv2.transform(ln, _RGB2YCC) - cv2.transform(gn, _RGB2YCC))[:, :, 1:]
    colour = float(np.mean(np.abs(chroma)) * 255.0)
    return {"psnr": psnr, "sharpness_ratio": sharp, "noise_residual": noise, "colour_shift": colour,
            "blockiness": _block_ratio(lny)}


def example_images(examples_dir: str | pathlib.Path) -> list[tuple[str, np.ndarray]]:
    """All PNG/JPEG images under `examples_dir`, sorted by relative path, as RGB uint8."""
    root = pathlib.Path(examples_dir)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no images under {root}")
    return [(str(p.relative_to(root)), np.asarray(Image.open(p).convert("RGB"))) for p in files]


def reference_crops(examples_dir: str | pathlib.Path, n: int, seed: int = 0, size: int = 512):
    """Yields n deterministic GT crops (upscale-if-small, random crop, no flip), crop i from image i % #images."""
    images = example_images(examples_dir)
    for i in range(n):
        _, img = images[i % len(images)]
        rng = np.random.default_rng([seed, i])
        yield prepare_gt(img, size, rng, flip=False)
