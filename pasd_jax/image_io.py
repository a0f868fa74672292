"""Reading the images people actually have, and writing results without ever clobbering a file.

Two readers share this module, because they answer different questions:
- user inputs (`read_image`): every file becomes 8-bit RGB plus its alpha channel when it has one (grayscale,
  palette, CMYK, 16-bit and float images are converted; 16-bit data is rounded, x / 257); what cannot be read
  raises `ImageReadError` with the reason and the path;
- training records (`decode_rgb`, `check_array`): the image becomes HxWx3 uint8 RGB or a named skip reason that the
  loader counts, so a bad file never stops a run. Alpha is dropped as PIL's `convert('RGB')` in PASD does, and
  16-bit data keeps its top byte, as the official loader's cv2 decode does.
Outputs are PNG, written atomically (`write_image`).
"""
from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pasd_jax.errors import ImageReadError
from pasd_jax.safe_write import atomic_write

# ------------------------------------------------------------------------------------------ user inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MIN_SIDE = 8


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    rgb: np.ndarray            # uint8 [H, W, 3]
    alpha: np.ndarray | None   # uint8 [H, W] when the file has transparency
    source_mode: str           # PIL mode of the file, for reporting


WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_uint8(arr: np.ndarray, high_byte: bool = False) -> np.ndarray:
    """High-bit-depth or float single-channel data -> uint8. Float data in [0, 1] is scaled by 255; 16-bit data
    (values above 255) maps 65535 -> 255, rounded (x / 257), or by its high byte (x >> 8, what OpenCV's 8-bit
    conversion and so basicsr's metric scripts do); 8-bit values stored wide stay as they are."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    if arr.max(initial=0) > 255:
        arr = arr >> 8 if high_byte else np.rint(arr / 257.0)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _convert(img: Image.Image) -> LoadedImage:
    mode = img.mode
    if mode in WIDE_MODES:
        gray = to_uint8(np.asarray(img))
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
    """Write a PNG atomically (a temp file unique to this process, then rename): an interrupted run never leaves
    a half-written image, and concurrent writers never see each other's partial files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(rgb, np.uint8), "RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(np.asarray(alpha, np.uint8), "L"))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# ------------------------------------------------------------------------------------------ training records

SKIP_REASONS = ("read_error", "corrupt", "truncated", "too_large", "unsupported_mode", "tiny")
CONVERT_KINDS = ("gray", "alpha", "palette", "high_bit_depth", "other_mode")


class SkipRecord(Exception):
    """A record that cannot become a training pair; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _high_bit_depth(img: Image.Image) -> np.ndarray:
    """16-bit (or 32-bit integer) grey -> uint8 by the top byte of the 16-bit range."""
    a = np.asarray(img)
    if a.dtype.kind not in "iu":
        raise SkipRecord("unsupported_mode", f"mode {img.mode}")
    a = np.clip(a.astype(np.int64), 0, 65535) >> 8
    return a.astype(np.uint8)


def decode_rgb(data: bytes, min_side: int = 1) -> tuple[np.ndarray, str | None]:
    """Encoded image bytes -> (HxWx3 uint8 RGB, the conversion applied or None); raises SkipRecord."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipRecord("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad headers)
        raise SkipRecord("corrupt", f"{type(e).__name__}: {e}") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:  # PIL only warns up to twice the limit
        raise SkipRecord("too_large", f"{img.width}x{img.height} pixels > {limit}")
    # 48-bit RGB PNGs load as 8-bit RGB (PIL keeps the top byte); only the tile's raw mode tells
    wide = any(";16" in str(getattr(t, "args", "")) for t in (img.tile or ()))
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise SkipRecord("truncated", f"{type(e).__name__}: {e}") from None
    rgb, kind = to_rgb(img, min_side)
    return rgb, ("high_bit_depth" if wide and kind is None else kind)


def to_rgb(img: Image.Image, min_side: int = 1) -> tuple[np.ndarray, str | None]:
    """A loaded PIL image -> (HxWx3 uint8 RGB, conversion kind or None); raises SkipRecord."""
    if min(img.size) < min_side:
        raise SkipRecord("tiny", f"{img.size[0]}x{img.size[1]} < {min_side}")
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), None
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        g = _high_bit_depth(img)
        return np.repeat(g[:, :, None], 3, axis=2), "high_bit_depth"
    if mode == "F":
        raise SkipRecord("unsupported_mode", "float image")
    kind = {"L": "gray", "1": "gray", "LA": "alpha", "RGBA": "alpha", "RGBa": "alpha", "La": "alpha",
            "P": "palette", "PA": "palette"}.get(mode, "other_mode")
    try:
        return np.asarray(img.convert("RGB")), kind
    except Exception as e:  # noqa: BLE001
        raise SkipRecord("unsupported_mode", f"mode {mode}: {e}") from None


def check_array(img: np.ndarray, min_side: int = 1) -> tuple[np.ndarray, str | None]:
    """An in-memory image (from a procedural or TFDS source that decoded already) -> RGB uint8."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise SkipRecord("unsupported_mode", f"array of shape {a.shape}")
    if min(a.shape[:2]) < min_side:
        raise SkipRecord("tiny", f"{a.shape[1]}x{a.shape[0]} < {min_side}")
    kind = None
    if a.dtype == np.uint16:
        a, kind = (a >> 8).astype(np.uint8), "high_bit_depth"
    elif a.dtype != np.uint8:
        raise SkipRecord("unsupported_mode", f"array dtype {a.dtype}")
    if a.shape[2] == 1:
        a, kind = np.repeat(a, 3, axis=2), kind or "gray"
    elif a.shape[2] == 4:
        a, kind = a[:, :, :3], kind or "alpha"
    return np.ascontiguousarray(a), kind
