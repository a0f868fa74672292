"""`sweep.png`: a fidelity and a perceptual metric against the ANS level, as in PASD's Fig. 3.

With matplotlib (`pip install 'pasd-jax[eval]'`) one axes with two y-axes; without it the same content drawn
with PIL as two labelled panels, so the sweep needs no plotting package. Each axis label says the metric and its
better direction (an arrow and "higher/lower is better"); a level where a metric is undefined is left out of its
line and marked "n/a".
"""
from __future__ import annotations

import dataclasses
import io
import math
import pathlib
import textwrap
from typing import Sequence

from PIL import Image, ImageDraw

from pasd_jax.evaluate.grid import fit_text, font
from pasd_jax.safe_write import atomic_write

PLOTTERS = ("auto", "matplotlib", "pil")
_COLOURS = ((31, 119, 180), (214, 39, 40))  # fidelity blue, perceptual red (matplotlib's C0 and C3)


@dataclasses.dataclass(frozen=True)
class Series:
    label: str                    # e.g. "PSNR (Y)"
    higher_is_better: bool
    values: Sequence[float | None]
    note: str = ""                # why values are missing, shown when none could be computed

    @property
    def axis_label(self) -> str:
        return f"{self.label} ({'higher' if self.higher_is_better else 'lower'} is better)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def plot(path: pathlib.Path, levels: Sequence[int], series: Sequence[Series], title: str,
         plotter: str = "auto") -> str:
    """Write the PNG atomically; returns the plotter used ("matplotlib" or "pil")."""
    if plotter not in PLOTTERS:
        raise ValueError(f"plotter must be one of {PLOTTERS}, got {plotter!r}")
    if plotter == "auto":
        plotter = "matplotlib" if have_matplotlib() else "pil"
    png = _matplotlib(levels, series, title) if plotter == "matplotlib" else _pil(levels, series, title)
    atomic_write(path, lambda tmp: tmp.write_bytes(png))
    return plotter


# --- matplotlib ----------------------------------------------------------------------------------------------------

def _matplotlib(levels: Sequence[int], series: Sequence[Series], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional, no pyplot state
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(6.4, 4.2), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    first = fig.add_subplot()
    first.set_xlabel("ANS level (added-noise timestep)")
    first.set_xticks(list(levels))
    first.set_title(title, fontsize=10)
    first.grid(alpha=0.3)
    for i, s in enumerate(series):
        ax = first if i == 0 else first.twinx()
        colour = tuple(c / 255 for c in _COLOURS[i % 2])
        ys = [math.nan if v is None else v for v in s.values]
        ax.plot(levels, ys, "o-", color=colour, label=s.label)
        ax.set_ylabel(f"{s.label} {'↑' if s.higher_is_better else '↓'}  "
                      f"({'higher' if s.higher_is_better else 'lower'} is better)", color=colour)
        ax.tick_params(axis="y", colors=colour)
        for x, v in zip(levels, s.values):
            if v is None:
                ax.annotate("n/a", (x, 0.03 + 0.06 * i), xycoords=("data", "axes fraction"), color=colour,
                            ha="center")
        if all(v is None for v in s.values):
            ax.set_yticks([])
            note = textwrap.fill(f"{s.label} not computed: {s.note or 'no value'}", 70)
            ax.text(0.5, 0.5 - 0.2 * i, note, transform=ax.transAxes, ha="center", va="center", color=colour,
                    fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- PIL -----------------------------------------------------------------------------------------------------------

_W, _H, _MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 460, 340, 70, 20, 56, 56


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        lo, hi = lo - max(abs(lo) * 0.05, 0.5), hi + max(abs(hi) * 0.05, 0.5)
    raw = (hi - lo) / max(1, count - 1)
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.floor(lo / step) * step
    ticks = [first]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(ticks[-1] + step)
    return ticks


def _wrap(text: str, face, width: int, max_lines: int = 8) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return [fit_text(t, face, width) for t in lines[:max_lines]]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _arrow(draw: ImageDraw.ImageDraw, x: int, y: int, up: bool, colour: tuple[int, int, int], size: int) -> None:
    """A filled arrow (the default font has no arrow glyphs), `size` pixels tall, top-left at (x, y)."""
    w = size // 2
    shaft = [(x + w // 2 - 1, y + size // 3), (x + w // 2 + 1, y + size)] if up else \
        [(x + w // 2 - 1, y), (x + w // 2 + 1, y + 2 * size // 3)]
    draw.rectangle(shaft, fill=colour)
    head = [(x, y + size // 2), (x + w, y + size // 2), (x + w // 2, y)] if up else \
        [(x, y + size // 2), (x + w, y + size // 2), (x + w // 2, y + size)]
    draw.polygon(head, fill=colour)


def _panel(s: Series, levels: Sequence[int], colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (_W, _H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f, small = font(15), font(12)
    left, top, right, bottom = _MARGIN_L, _MARGIN_T, _W - _MARGIN_R, _H - _MARGIN_B
    line = f.getbbox("Ag")[3]
    _arrow(d, left, 14, s.higher_is_better, colour, line + 2)
    d.text((left + line, 14), fit_text(s.axis_label, f, right - left - line), fill=colour, font=f)
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    lo_x, hi_x = min(levels), max(levels)
    span_x = max(hi_x - lo_x, 1)

    def px(level: float) -> float:
        return left + 12 + (level - lo_x) / span_x * (right - left - 24) if hi_x > lo_x else (left + right) / 2

    for level in levels:
        x = px(level)
        d.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        text = str(level)
        d.text((x - small.getlength(text) / 2, bottom + 6), text, fill=(0, 0, 0), font=small)
    label = "ANS level (added-noise timestep)"
    d.text(((left + right - small.getlength(label)) / 2, bottom + 26), label, fill=(0, 0, 0), font=small)
    known = [(lv, v) for lv, v in zip(levels, s.values) if v is not None and math.isfinite(v)]
    if not known:
        for k, text in enumerate(_wrap(f"not computed: {s.note}" if s.note else "not computed", small,
                                       right - left - 16)):
            d.text((left + 8, top + 20 + 16 * k), text, fill=colour, font=small)
        return img
    ticks = nice_ticks(min(v for _, v in known), max(v for _, v in known))
    lo_y, hi_y = ticks[0], ticks[-1]

    def py(v: float) -> float:
        return bottom - 10 - (v - lo_y) / (hi_y - lo_y) * (bottom - top - 20)

    for t in ticks:
        y = py(t)
        d.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        d.line([(left + 1, y), (right - 1, y)], fill=(232, 232, 232))
        text = _fmt(t)
        d.text((left - 6 - small.getlength(text), y - 7), text, fill=(0, 0, 0), font=small)
    xy = [None if v is None or not math.isfinite(v) else (px(lv), py(v)) for lv, v in zip(levels, s.values)]
    for a, b in zip(xy, xy[1:]):  # a missing level breaks the line, as matplotlib's NaN does
        if a is not None and b is not None:
            d.line([a, b], fill=colour, width=2)
    for (lv, v), (x, y) in zip(known, (p for p in xy if p is not None)):
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        text = _fmt(v)
        tx = x + 6 if x + 6 + small.getlength(text) < right - 2 else x - 6 - small.getlength(text)
        d.text((tx, y - 16), text, fill=colour, font=small)
    for lv, v in zip(levels, s.values):
        if v is None or not math.isfinite(v):
            d.text((px(lv) - 8, bottom - 22), "n/a", fill=colour, font=small)
    return img


def _pil(levels: Sequence[int], series: Sequence[Series], title: str) -> bytes:
    panels = [_panel(s, levels, _COLOURS[i % 2]) for i, s in enumerate(series)]
    head = 30
    canvas = Image.new("RGB", (_W * len(panels), _H + head), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    f = font(16)
    d.text((10, 8), fit_text(title, f, canvas.width - 20), fill=(0, 0, 0), font=f)
    for i, p in enumerate(panels):
        canvas.paste(p, (i * _W, head))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
