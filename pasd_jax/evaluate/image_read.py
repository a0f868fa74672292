"""Reading evaluation images as 8-bit RGB, the way basicsr's scripts see them (`cv2.imread(..., IMREAD_COLOR)`).

That means: EXIF orientation applied, alpha dropped, grayscale and palette images expanded to three channels, and
16-bit data reduced to its high byte (what OpenCV does). Anything unreadable raises `ImageReadError` naming the file.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pasd_jax.evaluate.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    if arr.max(initial=0) > 255:  # 16-bit samples: keep the high byte, as OpenCV's 8-bit conversion does
        arr = arr >> 8
    return np.clip(arr, 0, 255).astype(np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file."""
    path = pathlib.Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in _WIDE_MODES:
                gray = _wide_to_uint8(np.asarray(img))
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.ascontiguousarray(np.asarray(img.convert("RGB")))
    except FileNotFoundError:
        raise ImageReadError(f"image {path} does not exist") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path} is not an image PIL can read: re-save it as PNG or remove it") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path} ({e}): the file is damaged or truncated; "
                             "re-export it or remove it") from None
