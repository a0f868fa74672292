"""torchvision's `ResNet50_Weights.IMAGENET1K_V2.transforms()` reproduced with PIL + numpy, bit for bit.

PASD classifies with exactly that transform, so the same steps, rounding included, keep the predicted class (and
the 0.1 probability threshold) identical without importing torch:
  1. resize the shorter side to 232 with PIL's bilinear filter (torchvision hands PIL images to PIL; PIL widens the
     filter when shrinking, which is torchvision's implicit `antialias=True`); the long side is `int(232*long/short)`;
  2. center crop 224 with offsets `int(round((size - 224) / 2))` (Python rounding, half to even);
  3. uint8 HWC -> float32 CHW divided by 255 (a division, as `convert_image_dtype`, not a multiply by 1/255);
  4. `(x - mean) / std` per channel in float32 with the ImageNet statistics.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

RESIZE_SIZE = 232
CROP_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def resize_short_side(image: Image.Image, size: int = RESIZE_SIZE) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image: shorter side to `size`, long side floored."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: int = CROP_SIZE) -> Image.Image:
    """torchvision `CenterCrop(size)` for images at least `size` on each side (always true after the resize)."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"center_crop needs an image of at least {size}x{size}, got {w}x{h}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def imagenet_preprocess(image: Image.Image) -> np.ndarray:
    """PIL image -> normalised float32 `[3, 224, 224]`, as `IMAGENET1K_V2.transforms()` gives it."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = center_crop(resize_short_side(image))
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
