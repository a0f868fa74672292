"""Everything `sample.py` needs from disk: the PASD checkpoint, the SD1.5 base, and optional personalization.

`--ckpt` is an official PyTorch PASD folder (converted once, then served from the conversion cache), a folder
written by `pasd-convert import`, or a `train.py` work dir / checkpoint. `--base` supplies the VAE,
text encoder, tokenizer and scheduler config (a diffusers SD1.5 folder or a single file); a `train.py` checkpoint
remembers its base, so there it is optional.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from pasd_jax.convert.base import load_sd_base
from pasd_jax.convert.folders import CONTROLNET, TEXT_ENCODER, UNET, VAE, describe_folder
from pasd_jax.convert.io import PathLike, WeightFileError
from pasd_jax.convert.lora import LoraSpec, lcm_lora_spec
from pasd_jax.convert.personalize import apply_loras, swap_base
from pasd_jax.convert.release import is_flax_checkpoint, is_official_checkpoint, load_checkpoint
from pasd_jax.models.bundle import Models

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Loaded:
    models: Models
    params: dict
    scheduler_config: pathlib.Path
    tokenizer_dir: pathlib.Path
    variant: str
    notes: tuple[str, ...] = ()


def _train_checkpoint(path: pathlib.Path) -> dict | None:
    """A `train.py` work dir (or its checkpoints/ dir), restored at its latest step; None if it is not one."""
    from pasd_jax.runs.checkpoint import checkpoint_dir
    from pasd_jax.runs.export import restore_for_export

    ckdir = checkpoint_dir(path)
    if not ckdir.is_dir() or not any(p.is_dir() and p.name.isdigit() for p in ckdir.iterdir()):
        return None
    return restore_for_export(path)


def _lora_specs(lora: Any, multiplier: float, rule: str) -> list[LoraSpec]:
    if lora is None:
        return []
    if isinstance(lora, (str, pathlib.Path)):
        return [LoraSpec(lora, multiplier, rule)]
    return [item if isinstance(item, LoraSpec) else LoraSpec(item, multiplier, rule) for item in lora]


def load_for_sampling(ckpt: PathLike, *, base: PathLike | None = None, personalized: PathLike | None = None,
                      blending_alpha: float = 1.0, lora: "PathLike | Sequence[LoraSpec | PathLike] | None" = None,
                      lora_multiplier: float = 0.6, lora_rule: str = "alpha_scaled",
                      lcm_lora: PathLike | None = None, cache: Any = None,
                      scheduler_config: PathLike | None = None, scheduler_beside: bool = False,
                      param_dtype: Any = None) -> Loaded:
    """PASD UNet + ControlNet from `ckpt`, VAE / text encoder / tokenizer / scheduler from `base`.

    The scheduler config is `scheduler_config` when given, else with `scheduler_beside` (colorization, as the
    official grayscale mode) the `scheduler/` folder beside the checkpoint folder, else the base's.

    `lora`: one file (merged with `lora_multiplier` and `lora_rule`) or several `LoraSpec`s / paths, merged in
    order; `lcm_lora` is fused last with the official `--use_lcm_lora` rule (lora_scale 1, diffusers' scaling),
    after any personalized LoRA, as the official code does.

    `param_dtype` (the compute dtype, e.g. bf16): the weights are cast leaf by leaf while they are read, so the
    fp32 tree never sits beside the cast one (SD1.5 bf16 sampling on CPU: 16.9 GB peak before). The values equal
    the pipeline's own cast. Merges (personalized base, LoRAs) keep fp32 and leave the cast to the pipeline.
    """
    merges = personalized is not None or bool(lora) or lcm_lora is not None
    held = jnp.float32 if param_dtype is None or merges else param_dtype
    ckpt = pathlib.Path(ckpt)
    if not ckpt.exists():
        raise WeightFileError(f"--ckpt {ckpt} does not exist: give an official PASD checkpoint folder (with unet/ "
                              "and controlnet/), a folder from `pasd-convert import`, or a train.py "
                              "work dir")
    notes: list[str] = []
    scheduler = None  # checked before any weight is read
    if scheduler_config is not None or scheduler_beside:
        scheduler = scheduler_config if scheduler_config is not None else scheduler_beside_checkpoint(ckpt)
        if not _scheduler_json(pathlib.Path(scheduler)).is_file():
            raise WeightFileError(f"--scheduler-config {scheduler}: no scheduler_config.json there")
        notes.append(f"scheduler config: {_scheduler_json(pathlib.Path(scheduler))}")
    if is_official_checkpoint(ckpt) or is_flax_checkpoint(ckpt):
        pasd = load_checkpoint(ckpt, cache=cache, param_dtype=held)
        unet, controlnet = pasd[UNET], pasd[CONTROLNET]
    else:
        restored = _train_checkpoint(ckpt)
        if restored is None:
            raise WeightFileError(f"--ckpt {ckpt} is not a PASD checkpoint ({describe_folder(ckpt)}): expected "
                                  "unet/ and controlnet/ folders "
                                  "with config.json (official layout), a pasd-jax imported folder, or a train.py "
                                  "work dir with checkpoints")
        unet, controlnet = restored["unet"], restored["controlnet"]
        if base is None:
            base = restored.get("metadata", {}).get("base")
            if base:
                notes.append(f"SD base from the training checkpoint: {base}")
    if base is None:
        raise WeightFileError("--base is required: the Stable Diffusion 1.5 model that provides the VAE, text "
                              "encoder, tokenizer and scheduler (a diffusers folder or a single .safetensors file)")
    sd = load_sd_base(base, components=(VAE, TEXT_ENCODER), cache=cache, param_dtype=held)
    vae, text_encoder = sd.vae, sd.text_encoder
    if personalized is not None:
        result = swap_base(personalized, unet=unet, vae=vae, text_encoder=text_encoder, alpha=blending_alpha,
                           cache=cache)
        unet = (unet[0], result.unet)
        vae = (vae[0], result.vae)
        text_encoder = (text_encoder[0], result.text_encoder)
        notes.append(result.report.summary())
    specs = _lora_specs(lora, lora_multiplier, lora_rule)
    if lcm_lora is not None:
        specs.append(lcm_lora_spec(lcm_lora))
    if specs:
        merged = apply_loras(specs, unet=unet, text_encoder=text_encoder, cache=cache)
        unet = (unet[0], merged.unet)
        text_encoder = (text_encoder[0], merged.text_encoder)
        notes.append(merged.report.summary())
    models = Models(unet[0], controlnet[0], vae[0], text_encoder[0])
    params = {"unet": unet[1], "controlnet": controlnet[1], "vae": vae[1], "text_encoder": text_encoder[1]}
    return Loaded(models, params, pathlib.Path(scheduler or sd.scheduler_config), pathlib.Path(sd.tokenizer_dir),
                  unet[0].variant,
                  tuple(notes))


def _scheduler_json(path: pathlib.Path) -> pathlib.Path:
    return path if path.suffix == ".json" else path / "scheduler_config.json"


def scheduler_beside_checkpoint(ckpt: PathLike) -> pathlib.Path:
    """The `scheduler/` folder beside a checkpoint folder (official grayscale mode, release layout
    `runs/pasd_light_color/{checkpoint-180000, scheduler}`); for a train.py work dir, the one its export wrote
    (`export/scheduler`). One-line error naming where it was looked for."""
    ckpt = pathlib.Path(ckpt).absolute()
    candidates = [ckpt.parent / "scheduler", ckpt / "export" / "scheduler"]
    for folder in candidates[::-1]:  # a work dir's own export first: its parent is not a release folder
        if _scheduler_json(folder).is_file():
            return folder
    raise WeightFileError(
        f"colorization reads its scheduler from the scheduler/ folder beside the checkpoint (the release has "
        f"pasd_light_color/scheduler next to checkpoint-180000, a zero-terminal-SNR schedule), but there is no "
        f"{_scheduler_json(candidates[0])}: put the release's scheduler folder there, or pass --scheduler-config")
