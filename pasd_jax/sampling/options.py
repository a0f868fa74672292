"""What a sampling call can be asked for: `SamplingOptions` (validated on construction) and `SampleResult`.

Defaults are the official `test_pasd.py` ones (spec 4.1). Options that change a program's shapes or structure
(steps, scheduler, dtype, tiling, the pure-noise start) are part of its cache key; the others (guidance,
conditioning scale, ANS level and mode, offset-noise scale) are runtime arrays, so changing them reuses the program.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from pasd_jax.schedulers import ANS_MODES, SCHEDULER_KINDS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(name: str, backend: str | None = None) -> str:
    """`auto` -> float32 on a CPU, bfloat16 on accelerators; any other name as given.

    Why not bf16 everywhere: XLA's CPU backend has no bf16 (or fp16) dots and convolutions, so it widens every
    weight to fp32 and schedules those converts up front, keeping an fp32 copy of the whole UNet + ControlNet live
    beside the bf16 one (SD1.5 at 768 px: 11.9 GB resident in bf16), and the emulated arithmetic is slower."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {DTYPE_CHOICES}")
        return name
    import jax

    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
TILED_VAE_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings (official `test_pasd.py` defaults, spec 4.1). Validated on construction.

    tiled_vae: "auto" (official thresholds: encoder above tile + 64 px, decoder above tile + 22 latent px), "on",
    "off". vae_encoder_tile is in image pixels, vae_decoder_tile in latent pixels. tile_batch: latent tiles per
    ControlNet + UNet call in the tiled path (rounded up to a multiple of the device count); it fixes that
    program's shape, so every large image size reuses it.
    """
    steps: int = 20
    scheduler: str = "unipc"
    guidance_scale: float = 9.0
    conditioning_scale: float = 1.0
    added_noise_level: int = 900
    ans_mode: str = "paper"
    init_noise: bool = False
    offset_noise_scale: float = 0.0
    eta: float = 0.0
    latent_tile_size: int = 320
    latent_tile_overlap: int = 8
    tiled_vae: str = "auto"
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224
    dtype: str = "float32"
    tile_batch: int = 2

    def __post_init__(self):
        def fail(msg: str):
            raise ValueError(f"SamplingOptions: {msg}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        if self.tiled_vae is True or self.tiled_vae is False:
            object.__setattr__(self, "tiled_vae", "on" if self.tiled_vae else "off")
        if not is_int(self.steps) or self.steps < 1:
            fail(f"steps must be a positive integer, got {self.steps!r}")
        if self.scheduler not in SCHEDULER_KINDS:
            fail(f"scheduler must be one of {SCHEDULER_KINDS}, got {self.scheduler!r}")
        for name in ("guidance_scale", "conditioning_scale", "offset_noise_scale", "eta"):
            if not is_num(getattr(self, name)):
                fail(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.eta < 0:
            fail(f"eta must be >= 0, got {self.eta}")
        if self.eta > 0 and self.scheduler != "ddim":
            fail(f"eta only applies to the ddim scheduler (got eta={self.eta} with {self.scheduler})")
        if not is_int(self.added_noise_level) or not 0 <= self.added_noise_level <= 999:
            fail(f"added_noise_level must be an integer timestep in [0, 999], got {self.added_noise_level!r}")
        if self.ans_mode not in ANS_MODES:
            fail(f"ans_mode must be one of {ANS_MODES}, got {self.ans_mode!r}")
        if not isinstance(self.init_noise, bool):
            fail(f"init_noise must be a bool, got {self.init_noise!r}")
        if not is_int(self.latent_tile_size) or self.latent_tile_size < 1:
            fail(f"latent_tile_size must be a positive integer (latent pixels), got {self.latent_tile_size!r}")
        if (not is_int(self.latent_tile_overlap) or not 0 <= self.latent_tile_overlap < self.latent_tile_size):
            fail(f"latent_tile_overlap must be an integer in [0, latent_tile_size), got {self.latent_tile_overlap!r}")
        if self.tiled_vae not in TILED_VAE_MODES:
            fail(f"tiled_vae must be one of {TILED_VAE_MODES}, got {self.tiled_vae!r}")
        if not is_int(self.vae_encoder_tile) or self.vae_encoder_tile < 64 or self.vae_encoder_tile % 8:
            fail(f"vae_encoder_tile must be a multiple of 8 and >= 64 (image pixels), got {self.vae_encoder_tile!r}")
        if not is_int(self.vae_decoder_tile) or self.vae_decoder_tile < 8:
            fail(f"vae_decoder_tile must be an integer >= 8 (latent pixels), got {self.vae_decoder_tile!r}")
        if self.dtype not in DTYPES:
            fail(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not is_int(self.tile_batch) or self.tile_batch < 1:
            fail(f"tile_batch must be a positive integer, got {self.tile_batch!r}")

    @property
    def use_cfg(self) -> bool:
        """The official pipeline runs classifier-free guidance only when guidance_scale > 1."""
        return self.guidance_scale > 1.0


class SampleResult(NamedTuple):
    """`PASDPipeline.run` output; the float fields are None unless `debug=True`."""
    images: np.ndarray                 # [B, H, W, 3] uint8, before colour fix
    z_n: np.ndarray | None = None      # [B, 4, h, w] starting latent
    latents: np.ndarray | None = None  # [steps, B, 4, h, w] latent after every step
    decoded: np.ndarray | None = None  # [B, 3, H, W] VAE output, unclamped
    tiled: bool = False                # took the latent-tiling path
    devices: int = 1                   # devices the images (untiled) or tile chunks (tiled) were split over
