"""Comparison pictures: LQ (nearest and bicubic), each result and the GT side by side, the same zoomed crop under
each, labelled. Everything is shown at the GT's pixel grid, so the crop marks the same content in every column.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pasd_jax.evaluate.color import rgb_to_y
from pasd_jax.evaluate.errors import EvaluationError

_BG, _MISSING, _BOX = (255, 255, 255), (200, 200, 200), (255, 0, 0)
_PAD = 4


@dataclasses.dataclass(frozen=True)
class Panel:
    label: str
    image: np.ndarray | None     # uint8 [H, W, 3] at the GT size; None when there is nothing to show
    note: str = ""               # second label line: metric values, or why the image is missing


def lq_panels(lq: np.ndarray, size: tuple[int, int]) -> list[Panel]:
    """The LQ input enlarged to (w, h) by nearest neighbour and by bicubic interpolation."""
    img = Image.fromarray(lq)
    return [Panel("LQ (nearest)", np.asarray(img.resize(size, Image.NEAREST))),
            Panel("LQ (bicubic)", np.asarray(img.resize(size, Image.BICUBIC)))]


def auto_crop(gt: np.ndarray, size: int | None = None) -> tuple[int, int, int]:
    """(x, y, size) of the square with the most detail (gradient energy of the GT's luma); a quarter of the short
    side unless `size` is given."""
    h, w = gt.shape[:2]
    size = int(size or max(16, min(h, w) // 4))
    size = min(size, h, w)
    y = rgb_to_y(gt).astype(np.float64)
    energy = np.zeros((h, w))
    energy[:, 1:] += np.abs(np.diff(y, axis=1))
    energy[1:, :] += np.abs(np.diff(y, axis=0))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    stride = max(1, size // 4)
    ys, xs = np.arange(0, h - size + 1, stride), np.arange(0, w - size + 1, stride)
    sums = (integral[ys[:, None] + size, xs[None, :] + size] - integral[ys[:, None], xs[None, :] + size]
            - integral[ys[:, None] + size, xs[None, :]] + integral[ys[:, None], xs[None, :]])
    iy, ix = np.unravel_index(np.argmax(sums), sums.shape)
    return int(xs[ix]), int(ys[iy]), size


def check_crop(crop: tuple[int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int]:
    x, y, s = crop
    h, w = shape[:2]
    if s < 1 or x < 0 or y < 0 or x + s > w or y + s > h:
        raise EvaluationError(f"--grid-crop {x},{y},{s} does not fit in the {w}x{h} ground truth; "
                              "give X,Y,SIZE with X+SIZE <= width and Y+SIZE <= height")
    return crop


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def fit_text(text: str, face: ImageFont.ImageFont, width: int) -> str:
    """`text`, shortened with an ellipsis to fit in `width` pixels."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def comparison(panels: list[Panel], crop: tuple[int, int, int], width: int = 256) -> Image.Image:
    """One row of columns: the full image with the crop boxed, the crop enlarged below it, then the labels."""
    ref = next(p.image for p in panels if p.image is not None)
    h, w = ref.shape[:2]
    full_h = max(1, round(h * width / w))
    x, y, s = check_crop(crop, ref.shape)
    face = font(max(10, width // 20))
    line = face.getbbox("Ag")[3] + 2
    col_h = full_h + _PAD + width + _PAD + 2 * line
    canvas = Image.new("RGB", (len(panels) * (width + _PAD) + _PAD, col_h + 2 * _PAD), _BG)
    draw = ImageDraw.Draw(canvas)
    fx, fy = width / w, full_h / h
    for i, panel in enumerate(panels):
        left, top = _PAD + i * (width + _PAD), _PAD
        if panel.image is None or panel.image.shape[:2] != (h, w):
            draw.rectangle([left, top, left + width - 1, top + full_h + _PAD + width - 1], fill=_MISSING)
        else:
            img = Image.fromarray(panel.image)
            canvas.paste(img.resize((width, full_h), Image.BICUBIC), (left, top))
            canvas.paste(img.crop((x, y, x + s, y + s)).resize((width, width), Image.NEAREST),
                         (left, top + full_h + _PAD))
            draw.rectangle([left + round(x * fx), top + round(y * fy),
                            left + round((x + s) * fx) - 1, top + round((y + s) * fy) - 1], outline=_BOX, width=2)
        text_top = top + full_h + _PAD + width + _PAD
        draw.text((left, text_top), fit_text(panel.label, face, width), fill=(0, 0, 0), font=face)
        draw.text((left, text_top + line), fit_text(panel.note, face, width), fill=(60, 60, 60), font=face)
    return canvas


def with_caption(picture: Image.Image, lines: list[str], size: int = 14) -> Image.Image:
    """`picture` with lines of text under it (a notice, the settings), each wrapped to the picture's width."""
    face = font(size)
    width = picture.width - 2 * _PAD
    rows: list[str] = []
    for text in lines:
        row = ""
        for word in text.split():
            if row and face.getlength(f"{row} {word}") > width:
                rows.append(row)
                row = word
            else:
                row = f"{row} {word}".strip()
        rows.append(row)
    line = face.getbbox("Ag")[3] + 4
    canvas = Image.new("RGB", (picture.width, picture.height + len(rows) * line + _PAD), _BG)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        draw.text((_PAD, picture.height + i * line), fit_text(row, face, width), fill=(160, 0, 0), font=face)
    return canvas
