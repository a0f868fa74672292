"""Colorization training pairs (official `--control_type grayscale`, spec 6.4): the conditioning image is the GT
crop in gray (PIL `convert("L").convert("RGB")`, ITU-R 601 luma replicated to three channels) and the target is
the colour crop itself. No Real-ESRGAN degradation runs.

The official dataset hands the ControlNet `L / 255.` in float; the loader ships the uint8 luma and training divides
by 255 (`train.step`), which gives the same values. Selected with `data.pairs = "grayscale"`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

PAIR_KINDS = ("realesrgan", "grayscale")


def gray_condition(hq: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB crop -> HxWx3 uint8 with R = G = B = PIL's luma of it (the colorization ControlNet input)."""
    hq = np.asarray(hq)
    if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[-1] != 3:
        raise ValueError(f"expected a uint8 HWC RGB crop, got {hq.dtype} {hq.shape}")
    return np.asarray(Image.fromarray(hq, "RGB").convert("L").convert("RGB"))
