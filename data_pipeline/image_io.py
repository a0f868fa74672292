"""Image decoding that never stops a run: every input becomes HxWx3 uint8 RGB, or a named skip reason.

Conversions (counted, the image is kept): grey, alpha (dropped, as PIL's `convert('RGB')` in PASD),
palette, high bit depth (16-bit scaled to 8-bit by its top byte) and other modes (CMYK, YCbCr, ...).
Skips (counted, the record is replaced): unreadable bytes, truncated files, images too small to crop
from, decompression bombs, modes with no RGB meaning (float images), and read errors of the source itself.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

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
