"""PyTorch-layout model folders (diffusers / transformers `config.json` + weights) <-> (Flax module, params).

The model kind comes from the config, the PASD variant from the weight keys (the official UNet config does not
say whether it is `pasd` or `pasd_light`), and the RRDB switch from the config, checked against the keys.
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.convert.io import (PathLike, WeightFileError, find_weight_file, load_weights, read_json,
                                 save_safetensors, write_json)
from pasd_jax.convert.naming import DIFFUSERS, TRANSFORMERS
from pasd_jax.convert.tree import flax_to_torch, torch_to_flax
from pasd_jax.models.blocks import PASD, PASD_LIGHT, PLAIN
from pasd_jax.models.clip_text import CLIPTextEncoder
from pasd_jax.models.config import CLIPTextConfig, ConfigError, ControlNetConfig, UNetConfig, VAEConfig
from pasd_jax.models.controlnet import PASDControlNet
from pasd_jax.models.unet import PASDUNet
from pasd_jax.models.vae import AutoencoderKL

UNET, CONTROLNET, VAE, TEXT_ENCODER = "unet", "controlnet", "vae", "text_encoder"
DIFFUSERS_STEMS = ("diffusion_pytorch_model",)
TRANSFORMERS_STEMS = ("model", "pytorch_model")
_CLASS_KINDS = {"UNet2DConditionModel": UNET, "ControlNetModel": CONTROLNET, "AutoencoderKL": VAE}


def detect_kind(config: Mapping[str, Any], where: str = "config.json") -> str:
    cls = config.get("_class_name")
    if cls in _CLASS_KINDS:
        return _CLASS_KINDS[cls]
    if config.get("model_type") in ("clip_text_model", "clip") or "CLIPTextModel" in config.get("architectures", ()):
        return TEXT_ENCODER
    found = cls or config.get("model_type") or config.get("architectures") or "no _class_name/model_type"
    raise ConfigError(f"{where}: unknown model type ({found}); expected a diffusers UNet2DConditionModel, "
                      "ControlNetModel or AutoencoderKL config, or a transformers CLIPTextModel config")


KIND_NAMES = {UNET: "UNet (UNet2DConditionModel)", CONTROLNET: "ControlNet (ControlNetModel)",
              VAE: "VAE (AutoencoderKL)", TEXT_ENCODER: "CLIP text encoder (CLIPTextModel)"}
_SHORT = {UNET: "UNet", CONTROLNET: "ControlNet", VAE: "VAE", TEXT_ENCODER: "CLIP text encoder"}


def _config_name(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or ()
    return str(config.get("_class_name") or (archs[0] if archs else None) or config.get("model_type") or "?")


def describe_folder(path: PathLike) -> str:
    """What a folder given as a model is, in words, for messages ("it is a VAE model folder (...)")."""
    p = pathlib.Path(path)
    if not p.exists():
        return "it does not exist"
    if not p.is_dir():
        return f"it is a file ({p.suffix or 'no suffix'}), not a folder"
    if (p / "config.json").is_file():
        try:
            config = read_json(p / "config.json")
            kind = detect_kind(config, str(p / "config.json"))
        except (ConfigError, WeightFileError, ValueError):
            return "it is a model folder of an unknown type (its config.json names no diffusers/transformers class)"
        return f"it is a {_SHORT[kind]} model folder (config.json: {_config_name(config)})"
    subs = {q.name for q in p.iterdir() if (q / "config.json").is_file()}
    if (p / "model_index.json").is_file() or {VAE, TEXT_ENCODER} <= subs:
        return (f"it is a Stable Diffusion pipeline folder ({', '.join(f'{d}/' for d in sorted(subs))}): that is an "
                "SD base (--base), not a PASD checkpoint")
    if (p / "checkpoints").is_dir():
        return "it is a train.py work dir"
    listing = ", ".join(sorted(q.name + ("/" if q.is_dir() else "") for q in p.iterdir())[:8]) or "nothing"
    return f"it holds {listing}"


def check_kind(folder: PathLike, expected: str, role: str) -> None:
    """Refuse a model folder of another kind (a VAE in a checkpoint's unet/) before any weights are read."""
    folder = pathlib.Path(folder)
    config = read_json(folder / "config.json")
    try:
        kind = detect_kind(config, str(folder / "config.json"))
    except ConfigError as e:
        raise WeightFileError(f"{folder}: {e}; expected {role}") from None
    if kind != expected:
        raise WeightFileError(f"{folder} holds a {_SHORT[kind]} (config.json: {_config_name(config)}), but "
                              f"expected {role}: the folder is not what its name says (copied from another model?)")


def detect_unet_variant(keys) -> str:
    keys = list(keys)
    has_paca = any(".pixel_attentions." in k for k in keys)
    has_light = any(".attn2_plus." in k for k in keys)
    if has_paca and has_light:
        raise WeightFileError("UNet weights hold both pixel_attentions (pasd) and attn2_plus (pasd_light) keys")
    return PASD if has_paca else PASD_LIGHT if has_light else PLAIN


def controlnet_config_for_keys(config: Mapping[str, Any], keys, where: str) -> ControlNetConfig:
    keys = list(keys)
    cfg = ControlNetConfig.from_dict(config)
    has_rrdb = any(".preprocesser." in k for k in keys)
    if has_rrdb != cfg.use_rrdb:
        raise WeightFileError(
            f"{where}: config.json has use_rrdb={cfg.use_rrdb} but the weights "
            f"{'contain' if has_rrdb else 'lack'} controlnet_cond_embedding.preprocesser.* (RRDB) keys; "
            "the config and weights come from different checkpoints (pasd vs pasd_rrdb)")
    has_rgbs = any(".to_rgbs." in k for k in keys)
    return ControlNetConfig(**{**cfg.__dict__, "rgb_heads": has_rgbs})


def build_module(kind: str, config: Mapping[str, Any], *, variant: str = PASD, keys=None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False, where: str = ""):
    """The Flax module for a config dict (keys, when given, refine the ControlNet's RRDB/rgb-head switches)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if kind == UNET:
        return PASDUNet(UNetConfig.from_dict(config), variant=variant, remat=remat, **kw)
    if kind == CONTROLNET:
        cfg = ControlNetConfig.from_dict(config) if keys is None else controlnet_config_for_keys(config, keys, where)
        return PASDControlNet(cfg, remat=remat, **kw)
    if kind == VAE:
        return AutoencoderKL(VAEConfig.from_dict(config), **kw)
    if kind == TEXT_ENCODER:
        return CLIPTextEncoder(CLIPTextConfig.from_dict(config), **kw)
    raise ValueError(f"unknown model kind {kind!r}")


def abstract_params(module) -> Any:
    """Parameter shapes without allocating anything (jax.eval_shape over init)."""
    return jax.eval_shape(lambda r: module.init(r, *module.dummy_inputs()), jax.random.PRNGKey(0))["params"]


def init_params(module, rng: jax.Array) -> Any:
    return jax.jit(lambda r: module.init(r, *module.dummy_inputs()))(rng)["params"]


def style_of(kind: str) -> str:
    return TRANSFORMERS if kind == TEXT_ENCODER else DIFFUSERS


def _ignored(kind: str):
    if kind == TEXT_ENCODER:
        return lambda k: k.endswith("position_ids")
    return lambda k: False


def params_from_state_dict(module, kind: str, state: Mapping[str, np.ndarray], *, what: str = "model",
                           dtype: Any = None) -> Any:
    """Strictly map a PyTorch-named state dict onto `module`'s parameter tree (numpy leaves)."""
    return torch_to_flax(state, abstract_params(module), style=style_of(kind), what=what, ignore=_ignored(kind),
                         dtype=dtype)


def from_pytorch(folder: PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: bool = False) -> tuple[Any, Any]:
    """(module, params) for a UNet, ControlNet, VAE or CLIP text-encoder folder in PyTorch layout."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise WeightFileError(f"model folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        subs = sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())
        hint = (f"; it holds the model folders {subs}: point at one of them "
                "(or use pasd_jax.convert.load_pasd_checkpoint for a unet/ + controlnet/ checkpoint)") if subs else ""
        raise WeightFileError(f"no config.json in {folder}{hint}")
    config = read_json(cfg_path)
    kind = detect_kind(config, str(cfg_path))
    weights = find_weight_file(folder, TRANSFORMERS_STEMS if kind == TEXT_ENCODER else DIFFUSERS_STEMS)
    state = load_weights(weights)
    variant = detect_unet_variant(state) if kind == UNET else PASD
    module = build_module(kind, config, variant=variant, keys=state.keys(), dtype=dtype, param_dtype=param_dtype,
                          remat=remat, where=str(folder))
    params = params_from_state_dict(module, kind, state, what=f"{kind} weights {weights}", dtype=param_dtype)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def kind_of(module) -> str:
    for cls, kind in ((PASDUNet, UNET), (PASDControlNet, CONTROLNET), (AutoencoderKL, VAE),
                      (CLIPTextEncoder, TEXT_ENCODER)):
        if isinstance(module, cls):
            return kind
    raise TypeError(f"not a pasd-jax model: {type(module).__name__}")


def to_pytorch(module, params: Any, folder: PathLike) -> pathlib.Path:
    """Write `config.json` + fp32 safetensors in the official layout and key names; returns the weight path."""
    kind = kind_of(module)
    folder = pathlib.Path(folder)
    config = module.config.to_dict()
    if kind == CONTROLNET:
        config.update(use_rrdb=module.config.use_rrdb, return_rgbs=module.config.rgb_heads)
    state = flax_to_torch(params, style=style_of(kind))
    if kind == TEXT_ENCODER:
        path = folder / "model.safetensors"
        save_safetensors(state, path, metadata={"format": "pt"})
    else:
        path = folder / "diffusion_pytorch_model.safetensors"
        save_safetensors(state, path, metadata={"format": "pt"})
    write_json(config, folder / "config.json")
    return path


def load_pasd_checkpoint(folder: PathLike, **kw) -> dict[str, tuple[Any, Any]]:
    """An official PASD checkpoint folder (`unet/` + `controlnet/`) -> {"unet": (m, p), "controlnet": (m, p)}."""
    folder = pathlib.Path(folder)
    out = {}
    for sub in (UNET, CONTROLNET):
        if not (folder / sub).is_dir():
            raise WeightFileError(f"{folder} is not a PASD checkpoint: missing the {sub}/ folder "
                                  "(expected unet/ and controlnet/, as in runs/pasd/checkpoint-100000)")
        out[sub] = from_pytorch(folder / sub, **kw)
    if out[UNET][0].variant == PLAIN:
        raise WeightFileError(f"{folder / UNET} is a plain SD UNet: it has no PACA (pixel_attentions) or "
                              "pasd_light (attn2_plus) weights, so it is not a PASD checkpoint")
    return out
