"""The embedded tiny models with random weights: what the web UI serves when it is given no weights.

They let the app start offline on a fresh machine (nothing is downloaded) and exercise the whole request path:
the same modules, sampler, tasks and programs as with the real SD1.5-size PASD, only small. Their output is
noise-like, and the page says so. The configs ship in `pasd_jax/assets/tiny` (as `configs/tiny.py` uses them), the
tokenizer and scheduler in `pasd_jax/assets/sd15`; the weights are drawn on the host from a fixed seed, so every
start serves the same models.
"""
from __future__ import annotations

import json
import pathlib

from pasd_jax.convert import build_module
from pasd_jax.convert.folders import CONTROLNET, TEXT_ENCODER, UNET, VAE
from pasd_jax.models.bundle import Models
from pasd_jax.models.config import controlnet_config_from_unet
from pasd_jax.models.controlnet import controlnet_params_from_unet
from pasd_jax.runs.models import random_params, to_numpy
from pasd_jax.sampling.loading import Loaded

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
TINY = ASSETS / "tiny"
SD15 = ASSETS / "sd15"
VARIANT = "pasd"


def _config(kind: str) -> dict:
    return json.loads((TINY / kind / "config.json").read_text())


def load_tiny(seed: int = 0) -> Loaded:
    """Tiny PASD (UNet with PACA + ControlNet copied from it, VAE, CLIP text encoder) with random host weights."""
    unet_cfg = _config(UNET)
    configs = {UNET: unet_cfg, CONTROLNET: controlnet_config_from_unet(unet_cfg), VAE: _config(VAE),
               TEXT_ENCODER: _config(TEXT_ENCODER)}
    models = Models(unet=build_module(UNET, configs[UNET], variant=VARIANT),
                    controlnet=build_module(CONTROLNET, configs[CONTROLNET]),
                    vae=build_module(VAE, configs[VAE]),
                    text_encoder=build_module(TEXT_ENCODER, configs[TEXT_ENCODER]))
    params = {kind: random_params(getattr(models, kind), seed, kind) for kind in (UNET, CONTROLNET, VAE,
                                                                                  TEXT_ENCODER)}
    # As in a fresh training run: the ControlNet starts as a copy of the UNet's encoder (zero convs stay random).
    params[CONTROLNET] = to_numpy(controlnet_params_from_unet(params[UNET], params[CONTROLNET]))
    return Loaded(models, params, SD15 / "scheduler", SD15 / "tokenizer", VARIANT,
                  ("tiny random-weight models (no --ckpt given): the output shows the pipeline running, not PASD",))
