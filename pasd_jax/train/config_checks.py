"""Config checks that run before any model is built or compiled, each failing with what to change.

A bad value found after a multi-minute compile (or on the 500th host of a pod) wastes the allocation; everything
that can be checked from the config, the device count and the file system is checked here first.
"""
from __future__ import annotations

import pathlib

from pasd_jax.errors import ConfigError
from pasd_jax.models.blocks import PASD, PASD_LIGHT
from pasd_jax.sharding import BATCH_AXES, MeshError, mesh_shape

DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adam", "sgd")
BASE_PARTS = ("unet", "vae", "text_encoder")


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _config_file(path: str, key: str, what: str) -> None:
    p = pathlib.Path(path)
    ok = p.is_file() if p.suffix == ".json" else (p / "config.json").is_file()
    _need(bool(path) and ok, f"{key}={path!r}: no {what} config.json there")


def check_model(mc) -> None:
    _need(mc.variant in (PASD, PASD_LIGHT), f"model.variant={mc.variant!r}: expected {PASD!r} or {PASD_LIGHT!r}")
    _need(mc.compute_dtype in DTYPES, f"model.compute_dtype={mc.compute_dtype!r}: expected one of {DTYPES}")
    _need(len(tuple(mc.trainable)) > 0, "model.trainable is empty: name the UNet modules to train, e.g. "
          "('pixel_attentions', 'norm2_plus', 'attn2_plus', 'proj_in_plus')")
    if mc.base:
        base = pathlib.Path(mc.base)
        _need(base.is_dir(), f"model.base={mc.base!r} does not exist: point it at a diffusers SD1.5 folder "
              "(with unet/, vae/, text_encoder/), or leave it empty for random base models")
        parts = BASE_PARTS[1:] if mc.init_from else BASE_PARTS  # a PASD checkpoint brings its own UNet
        missing = [p for p in parts if not (base / p / "config.json").is_file()]
        _need(not missing, f"model.base={mc.base!r} has no {', '.join(f'{p}/config.json' for p in missing)}: "
              "it must be a diffusers pipeline folder (stable-diffusion-v1-5 layout)")
    if mc.init_from:
        src = pathlib.Path(mc.init_from)
        _need(src.is_dir(), f"model.init_from={mc.init_from!r} does not exist: give a PASD checkpoint folder "
              "(unet/ + controlnet/) or one of our run directories")
        from pasd_jax.train.setup import is_pytorch_checkpoint
        _need(not is_pytorch_checkpoint(src) or bool(mc.base),
              "model.init_from is a PyTorch PASD checkpoint, which has no VAE or text encoder: also set "
              "model.base to the SD1.5 folder")
    if not mc.base and not mc.init_from:
        _config_file(mc.unet_config, "model.unet_config", "UNet")
        _config_file(mc.vae_config, "model.vae_config", "VAE")
        _config_file(mc.text_encoder_config, "model.text_encoder_config", "text encoder")


def check_batch(config, sizes: dict[str, int], process_count: int) -> None:
    bs, accum = int(config.batch_size), int(config.grad_accum)
    _need(bs > 0 and accum > 0, f"batch_size={bs} and grad_accum={accum} must be positive")
    _need(bs % accum == 0, f"batch_size={bs} is not a multiple of grad_accum={accum}: batch_size counts the "
          "samples of one optimizer step over all micro-batches")
    micro = bs // accum
    shards = sizes[BATCH_AXES[0]] * sizes[BATCH_AXES[1]]
    _need(micro % shards == 0,
          f"batch_size={bs} with grad_accum={accum} gives {micro} samples per micro-batch, which do not split "
          f"over the {shards} batch shards (mesh data={sizes['data']} x fsdp={sizes['fsdp']}); use a batch_size "
          f"that is a multiple of grad_accum x data x fsdp = {accum * shards}")
    _need(micro % process_count == 0, f"{micro} samples per micro-batch do not split over {process_count} hosts")


def validate(config, *, n_devices: int, process_count: int = 1) -> dict[str, int]:
    """Check everything checkable up front; returns the mesh axis sizes."""
    _need(int(config.steps) > 0, f"steps={config.steps} must be positive")
    try:
        sizes = mesh_shape(dict(config.mesh), n_devices)
    except MeshError as e:
        raise ConfigError(str(e)) from None
    check_batch(config, sizes, process_count)
    check_model(config.model)
    o = config.optim
    _need(o.name in OPTIMIZERS, f"optim.name={o.name!r}: expected one of {OPTIMIZERS}")
    _need(float(o.lr) > 0, f"optim.lr={o.lr} must be positive")
    _need(0.0 <= float(config.diffusion.null_text_ratio) <= 1.0,
          f"diffusion.null_text_ratio={config.diffusion.null_text_ratio} must be in [0, 1]")
    sched = pathlib.Path(config.diffusion.scheduler)
    _need(sched.is_file() or (sched / "scheduler_config.json").is_file(),
          f"diffusion.scheduler={str(sched)!r}: no scheduler_config.json there")
    _need(config.loader.source in ("pipeline", "synthetic"),
          f"loader.source={config.loader.source!r}: expected 'pipeline' or 'synthetic'")
    _need(pathlib.Path(config.loader.tokenizer).is_dir(),
          f"loader.tokenizer={config.loader.tokenizer!r} does not exist: point it at a CLIP tokenizer folder")
    _need(int(config.loader.num_workers) >= 0, f"loader.num_workers={config.loader.num_workers} must be >= 0")
    crop = int(config.data.crop_size)
    _need(crop % 8 == 0 and crop >= 64, f"data.crop_size={crop}: must be a multiple of 8 and at least 64 (the VAE "
          "and the degradation-removal pyramid downsample by 8)")
    _need(int(config.checkpoint_every) > 0, f"checkpoint_every={config.checkpoint_every} must be positive")
    _need(int(config.max_to_keep) > 0, f"max_to_keep={config.max_to_keep} must be positive")
    _need(int(config.log_every) > 0, f"log_every={config.log_every} must be positive")
    if config.get("validation") is not None:
        check_validation(config.validation)
    return sizes


def check_validation(v) -> None:
    """Validation samples: the images exist and the sampling settings are valid (before any compile)."""
    _need(int(v.every) >= 0, f"validation.every={v.every} must be >= 0 (0 turns validation samples off)")
    if not int(v.every):
        return
    from pasd_jax.image_io import find_images
    from pasd_jax.train.validation import validation_options

    images = pathlib.Path(v.images) if v.images else None
    _need(images is not None and images.exists(),
          f"validation.images={v.images!r} does not exist: give an LQ image file or a small folder of them, or "
          "set validation.every=0")
    try:
        find_images(images)
    except FileNotFoundError as e:
        raise ConfigError(f"validation.images: {e}") from None
    try:
        validation_options(v)
    except ValueError as e:
        raise ConfigError(f"validation: {e}") from None
