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
from pasd_jax.image_io import IMAGE_SUFFIXES as _ALL_SUFFIXES
from pasd_jax.image_io import WIDE_MODES, to_uint8

IMAGE_SUFFIXES = tuple(x for x in _ALL_SUFFIXES if x != ".gif")  # the still-image formats of the benchmarks


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file."""
    path = pathlib.Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in WIDE_MODES:
                gray = to_uint8(np.asarray(img), high_byte=True)
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
