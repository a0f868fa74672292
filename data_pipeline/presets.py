"""Degradation presets: every number of the two-stage Real-ESRGAN degradation lives here.

`PASD` is what PASD trains with (its `params_realesrgan.yml` plus the constants hard-coded in its
`degrade_process`): milder ranges than Real-ESRGAN, no USM sharpening. `REALESRGAN_X4PLUS` swaps in the
upstream `train_realesrgan_x4plus.yml` ranges. It only changes parameter ranges: upstream's USM-sharpened
GT, batch-shared draws and 256/64 paired crops are training-recipe choices outside `degrade`.

Presets are frozen dataclasses (hashable, typed, safe to share between worker processes);
`DegradationConfig.from_dict` accepts a plain dict or an ml_collections ConfigDict so a training config
can override single fields (`--config.data.degradation.stage1.noise_range='(1, 20)'`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Random blur kernel of one stage (sizes drawn from odd `sizes`)."""

    sinc_prob: float = 0.1
    type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # in KERNEL_TYPES order
    sigma_range: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Blur -> resize -> noise -> JPEG parameters of one degradation stage."""

    kernel: KernelConfig = KernelConfig()
    blur_prob: float = 1.0
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.3, 1.5)  # down ~ U(lo, 1), up ~ U(1, hi)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)  # sigma on the 0-255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)  # continuous DiffJPEG quality


@dataclasses.dataclass(frozen=True)
class DegradationConfig:
    """The whole LQ synthesis. `scale` is the stage-2 downscale (PASD hard-codes 4)."""

    stage1: StageConfig = StageConfig()
    stage2: StageConfig = StageConfig()
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    scale: int = 4
    resize_back: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "DegradationConfig",
                  base: "DegradationConfig | None" = None) -> "DegradationConfig":
        """A config from a (possibly partial) nested mapping, overlaid on `base` (the PASD preset)."""
        if isinstance(d, DegradationConfig):
            return d
        return _overlay(PASD if base is None else base, d)


def _overlay(base, d: Mapping[str, Any]):
    d = dict(d.items())
    names = {f.name for f in dataclasses.fields(base)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"unknown {type(base).__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name, v in d.items():
        cur = getattr(base, name)
        if dataclasses.is_dataclass(cur):
            kwargs[name] = v if isinstance(v, type(cur)) else _overlay(cur, v)
        elif isinstance(cur, tuple):
            kwargs[name] = tuple(v)
        else:
            kwargs[name] = type(cur)(v)
    return dataclasses.replace(base, **kwargs)


PASD = DegradationConfig(
    stage1=StageConfig(),
    stage2=StageConfig(
        kernel=KernelConfig(sigma_range=(0.2, 1.5)),
        blur_prob=0.5,
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.6, 1.2),
        noise_range=(1.0, 12.0),
        poisson_scale_range=(0.05, 1.0),
        jpeg_range=(60.0, 100.0),
    ),
)

REALESRGAN_X4PLUS = dataclasses.replace(
    PASD,
    stage1=dataclasses.replace(
        PASD.stage1, resize_range=(0.15, 1.5), noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0),
        jpeg_range=(30.0, 95.0)),
    stage2=dataclasses.replace(
        PASD.stage2, blur_prob=0.8, resize_range=(0.3, 1.2), noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5), jpeg_range=(30.0, 95.0)),
)

PRESETS: dict[str, DegradationConfig] = {"pasd": PASD, "realesrgan_x4plus": REALESRGAN_X4PLUS}


def get_preset(name: str) -> DegradationConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown degradation preset {name!r}; known: {sorted(PRESETS)}") from None
