"""The Y channel of YCbCr as Real-ISR papers measure it (MATLAB `rgb2ycbcr`, ITU-R BT.601, 16..235 range).

Computed in the precision basicsr's `to_y_channel` uses (8-bit data / 255 in float32, the weighted sum in float64,
result cast to float32 and scaled back to 0..255, not rounded), so Y-channel metrics agree with published numbers.
"""
from __future__ import annotations

import numpy as np

_BT601_Y = np.array([65.481, 128.553, 24.966])  # R, G, B weights for data in [0, 1]; offset 16


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """float32 [H, W] Y channel (0..255 scale) of a uint8 [H, W, 3] RGB image."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {rgb.shape}")
    unit = rgb.astype(np.float32) / np.float32(255.0)
    y = (unit.astype(np.float64) @ _BT601_Y + 16.0) / 255.0
    return y.astype(np.float32) * np.float32(255.0)
