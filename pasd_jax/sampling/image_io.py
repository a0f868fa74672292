"""Reading the images people actually have, and writing results without ever clobbering a file.

Every input becomes 8-bit RGB (plus its alpha channel when it has one): grayscale, palette, CMYK, 16-bit and float
images are converted. What cannot be read raises `ImageReadError` with the reason and the path.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MIN_SIDE = 8


class ImageReadError(ValueError):
    """An input file that is not a usable image (unreadable, truncated, not an image, too small)."""


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    rgb: np.ndarray            # uint8 [H, W, 3]
    alpha: np.ndarray | None   # uint8 [H, W] when the file has transparency
    source_mode: str           # PIL mode of the file, for reporting


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth or float single-channel data -> uint8 with rounding."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    # 16-bit data (PNG 'I;16' or 'I' holding 0..65535) maps 65535 -> 255; 8-bit values stored wide stay as they are.
    if arr.max(initial=0) > 255:
        return np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _convert(img: Image.Image) -> LoadedImage:
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_uint8(np.asarray(img))
        return LoadedImage(np.repeat(gray[..., None], 3, axis=-1), None, mode)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return LoadedImage(np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]), mode)
    return LoadedImage(np.asarray(img.convert("RGB")), None, mode)


def read_image(path: str | os.PathLike) -> LoadedImage:
    path = pathlib.Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now, so a truncated file fails here and not halfway through sampling
                loaded = _convert(img)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: file not found") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(f"{path}: not an image file (PIL cannot identify it)") from e
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: image too large to open safely ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: unreadable or truncated image ({e})") from e
    h, w = loaded.rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(f"{path}: image is {w}x{h}; both sides must be at least {MIN_SIDE} pixels")
    return loaded


def find_images(root: str | os.PathLike) -> list[tuple[pathlib.Path, str]]:
    """(path, relative name) of every image under a folder (recursive, sorted), or of a single file."""
    root = pathlib.Path(root)
    if root.is_file():
        return [(root, root.name)]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    found = [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*"))
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return found


def output_name(relative: str) -> str:
    """Results are PNG (lossless); `a/b.jpg` -> `a/b.png`."""
    return str(pathlib.PurePosixPath(relative).with_suffix(".png"))


def write_image(path: pathlib.Path, rgb: np.ndarray, alpha: np.ndarray | None = None) -> None:
    """Write a PNG atomically (temp file + rename): an interrupted run never leaves a half-written image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(rgb, np.uint8), "RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(np.asarray(alpha, np.uint8), "L"))
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
