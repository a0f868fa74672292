"""The models and starting parameters of a PASD training run.

Three ways to start (spec 5, 3.5): an SD1.5 diffusers folder as the frozen base with a fresh ControlNet copied from
its UNet (`from_unet`) and fresh PACA (PyTorch-default init, not zero); an official PASD checkpoint (or one of our
own runs) to fine-tune; or, with no base folder, random base models from config files (tiny CPU runs). The frozen
base is always *referenced by path*: a random base is written once as PyTorch folders into the work dir, so a
checkpoint holds only what training changes and export reads the exact fp32 base back.
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax

from pasd_jax.convert import build_module, from_pytorch, to_pytorch
from pasd_jax.convert.folders import CONTROLNET, TEXT_ENCODER, UNET, VAE
from pasd_jax.convert.io import read_json
from pasd_jax.models.blocks import PLAIN
from pasd_jax.models.config import controlnet_config_from_unet
from pasd_jax.models.controlnet import controlnet_params_from_unet
from pasd_jax.sharding import trainable_split
from pasd_jax.runs.checkpoint import read_metadata
from pasd_jax.runs.export import restore_for_export
from pasd_jax.models.bundle import Models
from pasd_jax.runs.models import BASE_KINDS, Tree, load_frozen, random_params, to_numpy


def _config_json(folder_or_file: str | pathlib.Path) -> dict:
    p = pathlib.Path(folder_or_file)
    return read_json(p if p.suffix == ".json" else p / "config.json")


def is_pytorch_checkpoint(path: str | pathlib.Path) -> bool:
    """An official-layout PASD checkpoint folder (unet/ + controlnet/ with config.json)."""
    p = pathlib.Path(path)
    return (p / UNET / "config.json").is_file() and (p / CONTROLNET / "config.json").is_file()


def model_config_dicts(mc: Mapping[str, Any]) -> dict[str, dict]:
    """config.json dicts of the unet, controlnet, vae and text encoder for the `model` section of a config."""
    if mc["init_from"] and is_pytorch_checkpoint(mc["init_from"]):
        src = pathlib.Path(mc["init_from"])
        unet, controlnet = _config_json(src / UNET), _config_json(src / CONTROLNET)
    elif mc["init_from"]:
        meta = read_metadata(mc["init_from"])
        unet, controlnet = meta["model_configs"][UNET], meta["model_configs"][CONTROLNET]
    elif mc["base"]:
        unet, controlnet = _config_json(pathlib.Path(mc["base"]) / UNET), None
    else:
        unet, controlnet = _config_json(mc["unet_config"]), None
    if controlnet is None:
        controlnet = controlnet_config_from_unet(unet, use_rrdb=bool(mc["use_rrdb"]))
    if mc["base"]:
        vae, text = (_config_json(pathlib.Path(mc["base"]) / k) for k in (VAE, TEXT_ENCODER))
    else:
        vae, text = _config_json(mc["vae_config"]), _config_json(mc["text_encoder_config"])
    return {UNET: unet, CONTROLNET: controlnet, VAE: vae, TEXT_ENCODER: text}


def fresh_start(config, models: Models, configs: Mapping[str, dict],
                workdir: str | pathlib.Path) -> tuple[dict, dict, dict[str, str]]:
    """(trainable fp32, frozen fp32, base folders) for a new run; numpy trees, identical on every host.

    A random base (no `model.base`) is written to `<workdir>/base` by process 0 (the caller syncs hosts).
    Random values are drawn on the host from `config.seed` (`random_params`), the same on every host."""
    mc = config.model
    names = tuple(mc.trainable)
    if mc.init_from:
        unet, controlnet, base = _from_pasd(config, models)
        frozen = load_frozen(models, base, names, unet=unet)
        return {CONTROLNET: controlnet, UNET: trainable_split.split_unet(unet, names)[0]}, frozen, base
    fresh = {kind: random_params(getattr(models, kind), config.seed, kind) for kind in (UNET, CONTROLNET)}
    if not mc.base:
        fresh.update({kind: random_params(getattr(models, kind), config.seed, kind) for kind in (VAE, TEXT_ENCODER)})
    paca, random_sd = trainable_split.split_unet(fresh[UNET], names)
    if mc.base:
        base = {k: str(pathlib.Path(mc.base) / k) for k in BASE_KINDS}
        frozen = load_frozen(models, base, names)
    else:
        frozen = {UNET: random_sd, VAE: fresh[VAE], TEXT_ENCODER: fresh[TEXT_ENCODER]}
        base = write_base(models, configs, frozen, pathlib.Path(workdir) / "base")
    unet = trainable_split.merge(frozen[UNET], paca)
    controlnet = to_numpy(controlnet_params_from_unet(unet, fresh[CONTROLNET]))
    return {CONTROLNET: controlnet, UNET: paca}, frozen, base


def _from_pasd(config, models: Models) -> tuple[dict, dict, dict[str, str]]:
    """Fine-tuning start: an official-layout PASD checkpoint folder or one of our run/checkpoint dirs."""
    mc = config.model
    src = pathlib.Path(mc.init_from)
    if is_pytorch_checkpoint(src):
        (unet_m, unet), (_, controlnet) = from_pytorch(src / UNET), from_pytorch(src / CONTROLNET)
        base = {UNET: str(src / UNET), VAE: str(pathlib.Path(mc.base) / VAE),
                TEXT_ENCODER: str(pathlib.Path(mc.base) / TEXT_ENCODER)}
        variant = unet_m.variant
    else:
        got = restore_for_export(src)
        (unet_m, unet), (_, controlnet) = got[UNET], got[CONTROLNET]
        base, variant = got["metadata"]["base"], got["metadata"]["variant"]
    if variant != models.variant:
        raise ValueError(f"{src} holds a {variant} UNet but the config asks for model.variant={models.variant!r}")
    return to_numpy(unet), to_numpy(controlnet), base


def write_base(models: Models, configs: Mapping[str, dict], frozen: Mapping[str, Tree],
               folder: pathlib.Path) -> dict[str, str]:
    """Write a random frozen base as PyTorch folders (process 0) and return their paths."""
    paths = {k: str(folder / k) for k in BASE_KINDS}
    if jax.process_index() == 0:
        modules = {UNET: build_module(UNET, configs[UNET], variant=PLAIN), VAE: models.vae,
                   TEXT_ENCODER: models.text_encoder}
        for kind in BASE_KINDS:
            to_pytorch(modules[kind], frozen[kind], paths[kind])
    return paths
