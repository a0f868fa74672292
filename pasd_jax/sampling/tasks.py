"""What differs between PASD's tasks around the sampler: preprocessing of the input, post-processing of the result,
the prompt defaults and the scheduler's home.

`sr` is Real-ISR (official `--control_type realisr`): upscale, short side to the process size, colour fix, resize
to the requested output size. `colorize` is the official `--control_type grayscale` path (spec 4.2, 4.3, 4.4,
4.9): the input made gray (L replicated to RGB), the short-side resize always run with the long side capped at
2 x process size, upscale forced to 1; the prompt's "black and white" becomes "color", the negative prompt is
"b&w, color bleeding", no added prompt; the scheduler from the `scheduler/` folder beside the checkpoint; the
result resized back to the input size and merged in YUV (input luma, result chroma), no colour fix.
The sampler itself is the same program for both.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

from pasd_jax import image_ops
from pasd_jax.prompts import rules
from pasd_jax.sampling import colorize

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
    """The official preprocessing of the task (spec 4.2). Colorization ignores `upscale` (the official forces 1)."""
    task = resolve(task)
    h, w = rgb.shape[:2]
    if task == SR:
        lq = image_ops.preprocess_official(rgb, upscale, process_size)
        return Prepared(lq, rgb, (w * upscale, h * upscale))
    gray = colorize.to_gray_rgb(rgb)
    lq = image_ops.preprocess_official(gray, 1, process_size, control_type="grayscale")
    return Prepared(lq, gray, (w, h))


def finish(task: str, out: np.ndarray, prepared: Prepared, color_fix: str) -> np.ndarray:
    """The official post-processing of the task: the final uint8 [H, W, 3] image.

    Colorization never colour-fixes (`color_fix` is ignored): the YUV merge keeps the input's luma already, and a
    low-frequency transfer from the gray input would remove the colours."""
    task = resolve(task)
    if task == SR:
        if color_fix == "wavelet":
            out = np.asarray(image_ops.wavelet_color_fix(out, prepared.lq))
        elif color_fix == "adain":
            out = np.asarray(image_ops.adain_color_fix(out, prepared.lq))
        return image_ops.pil_resize(out, prepared.out_size, Image.BICUBIC)
    return colorize.merge_chroma(np.asarray(out), prepared.original)


# --- prompts ------------------------------------------------------------------------------------------------------


def default_added_prompt(task: str) -> str:
    """`--added-prompt` when not given: the official realisr one, none for colorization."""
    return rules.DEFAULT_ADDED_PROMPT if resolve(task) == SR else ""


def default_negative_prompt(task: str) -> str:
    """`--negative-prompt` when not given: the official one of the task."""
    return rules.negative_prompt_for(control_type(task), rules.DEFAULT_NEGATIVE_PROMPT)


def with_added_prompt(task: str, prompt_fn: Callable[[Image.Image, str], str], added_prompt: str,
                      separator: bool = False) -> Callable[[Image.Image, str], str]:
    """Colorization with a user-given added prompt: appended after the colour rule, as realisr appends its own.

    `prompt_fn` is a grayscale-mode prompt function (which uses no added prompt); for sr, or an empty added prompt,
    it is returned unchanged."""
    if resolve(task) == SR or not added_prompt:
        return prompt_fn
    return lambda image, path: rules.join_added_prompt(prompt_fn(image, path), added_prompt, separator)


def notes(task: str, upscale: int) -> list[str]:
    """One line per setting the task overrides, for the user who asked for it."""
    if resolve(task) == COLORIZE and upscale != 1:
        return [f"colorize: --upscale {upscale} is ignored; colorization keeps the input size (the official "
                "--control_type grayscale forces upscale 1)"]
    return []
