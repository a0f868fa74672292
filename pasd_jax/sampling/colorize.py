"""The colorization task's image rules (official `test_pasd.py --control_type grayscale`, spec 4.2 and 4.9).

- Input: PIL's `convert("L").convert("RGB")` (ITU-R 601 luma, R = G = B). The prompt provider, the pipeline and the
  final merge all see this gray image, never the colours of the file (an old photo may carry a sepia tint).
- Output: the pipeline's RGB result resized to the original size with OpenCV's INTER_LINEAR, converted to YUV with
  OpenCV, and merged: Y from the gray input, U and V from the result; back to RGB with OpenCV. No wavelet colour
  fix: it would pull the low frequencies, i.e. the colours, back to the gray input.

OpenCV is used as the library, not re-derived: its 8-bit resize and YUV conversions are fixed-point, and the
golden (`tiny_pipeline_gray`) shows the official merge uses exactly these calls. The official code passes the gray
RGB array to `COLOR_BGR2YUV` as if it were BGR; with R = G = B that is the same array, so here it is converted
in its true order.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def _check_rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be a uint8 HWC RGB image, got {image.dtype} {image.shape}")
    return image


def to_gray_rgb(rgb: np.ndarray) -> np.ndarray:
    """PIL `convert("L").convert("RGB")`: the luma replicated to three channels (uint8 HWC)."""
    rgb = _check_rgb(rgb, "the input")
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L").convert("RGB"))


def merge_chroma(colour_rgb: np.ndarray, gray_rgb: np.ndarray) -> np.ndarray:
    """The official colorization post-processing: `colour_rgb` (any size) resized to `gray_rgb`'s size, and the
    result's U/V put on the gray image's Y (OpenCV YUV, BT.601). Returns uint8 HWC RGB at the gray image's size.

    Y is kept exactly in YUV; the RGB conversion clips to [0, 255], so where the chroma is strong the final luma
    can differ from the input's by a few levels (the official output has the same clipping)."""
    import cv2

    colour_rgb = _check_rgb(colour_rgb, "the colorized image")
    gray_rgb = _check_rgb(gray_rgb, "the gray input")
    h, w = gray_rgb.shape[:2]
    bgr = np.ascontiguousarray(colour_rgb[:, :, ::-1])
    if bgr.shape[:2] != (h, w):
        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    merged = cv2.cvtColor(np.ascontiguousarray(gray_rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    merged[:, :, 1:3] = yuv[:, :, 1:3]
    return np.ascontiguousarray(cv2.cvtColor(merged, cv2.COLOR_YUV2BGR)[:, :, ::-1])


def chroma(rgb: np.ndarray) -> np.ndarray:
    """OpenCV U and V minus 128 (float32 [H, W, 2]): zero for a gray image; tests and diagnostics use it."""
    import cv2

    rgb = _check_rgb(rgb, "the image")
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    return yuv[:, :, 1:3].astype(np.float32) - 128.0
