"""GT preparation as PASD's datasets do it: upscale small images, random crop, random horizontal flip, tokenize.

Small images (short side < crop) are upscaled with PIL bicubic by crop/short + 0.02 with ceil'd sizes, as
PASD's `convert_image_to_fn` does, so that a crop always fits. One 50% flip here replaces PASD's two
(torchvision's and basicsr's inside the degradation), which compose to the same 50% flip of GT and LQ.
Null-caption replacement is *not* done here: its rate is a training setting.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

UPSCALE_EPS = 0.02
MAX_TOKENS = 77


def upscale_short_side(img: np.ndarray, min_size: int) -> np.ndarray:
    """HxWx3 uint8 -> the same image, PIL-bicubic upscaled if its short side is below `min_size`."""
    h, w = img.shape[:2]
    if min(h, w) >= min_size:
        return img
    scale = min_size / min(h, w) + UPSCALE_EPS
    size = (math.ceil(w * scale), math.ceil(h * scale))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))


def random_crop_flip(img: np.ndarray, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """A uniformly placed size x size crop (no padding), mirrored left-right with prob 1/2 when `flip`."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop {size}: upscale it first")
    top = int(rng.integers(h - size + 1))
    left = int(rng.integers(w - size + 1))
    crop = img[top:top + size, left:left + size]
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def prepare_gt(img: np.ndarray, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """Upscale-if-small, random crop and flip: the 512x512 GT that the degradation starts from."""
    return random_crop_flip(upscale_short_side(img, size), size, rng, flip)
