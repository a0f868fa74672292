"""What differs between PASD's tasks around the sampler: preprocessing of the input, post-processing of the result.

`sr` is Real-ISR (official `--control_type realisr`): upscale, short side to the process size, colour fix, resize
to the requested output size. `colorize` is the official `--control_type grayscale` path (spec 4.2, 4.3, 4.9).
The sampler itself is the same program for both.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from pasd_jax import image_ops

SR, COLORIZE = "sr", "colorize"
TASKS = (SR, COLORIZE)
ALIASES = {"realisr": SR, "grayscale": COLORIZE}  # the official --control_type names
COLOR_FIXES = ("wavelet", "adain", "none")


def resolve(task: str) -> str:
    """A task name or its official alias -> the task name; raises ValueError naming the choices."""
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"--task must be one of {TASKS} (or the official names {tuple(ALIASES)}), got {task!r}")
    return name


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One input ready for the sampler, and what post-processing needs of the original."""
    lq: np.ndarray            # uint8 [h, w, 3], multiple of 8: the pipeline input
    original: np.ndarray      # uint8 [H, W, 3] as read (after the task's input conversion)
    out_size: tuple[int, int]  # (w, h) of the final output


def control_type(task: str) -> str:
    return "grayscale" if resolve(task) == COLORIZE else "realisr"


def prepare(task: str, rgb: np.ndarray, upscale: int, process_size: int) -> Prepared:
    """The official preprocessing of the task (spec 4.2)."""
    task = resolve(task)
    if task == SR:
        h, w = rgb.shape[:2]
        lq = image_ops.preprocess_official(rgb, upscale, process_size)
        return Prepared(lq, rgb, (w * upscale, h * upscale))
    raise NotImplementedError("colorize preprocessing")


def finish(task: str, out: np.ndarray, prepared: Prepared, color_fix: str) -> np.ndarray:
    """The official post-processing of the task: the final uint8 [H, W, 3] image."""
    task = resolve(task)
    if task == SR:
        if color_fix == "wavelet":
            out = np.asarray(image_ops.wavelet_color_fix(out, prepared.lq))
        elif color_fix == "adain":
            out = np.asarray(image_ops.adain_color_fix(out, prepared.lq))
        return image_ops.pil_resize(out, prepared.out_size, Image.BICUBIC)
    raise NotImplementedError("colorize post-processing")
