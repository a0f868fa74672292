"""Original-LDM single-file checkpoints (civitai-style SD1.x `.safetensors` / `.ckpt`) -> diffusers-named tensors.

Personalized models for PASD's stylization are distributed in the CompVis/LDM key layout
(`model.diffusion_model.input_blocks.4.1...`). The mapping to diffusers names is derived here from the block structure
of the target config (block types and `layers_per_block`), the way the LDM UNet lays out its `input_blocks` /
`output_blocks` lists, not from a fixed table, so any SD1.x-layout config converts. The file carries no config: it
comes from a `--base` diffusers folder or from the SD1.5 configs shipped in `pasd_jax/assets/sd15`.

Every key is accounted for: weights are mapped, known non-weight buffers (EMA copies, the DDPM schedule, CLIP
`position_ids`) are ignored and reported, and anything else is an error listing the keys, so a wrong or damaged file
never loads half-way. Arrays keep their dtype and are not copied (the only transform is a reshape of the VAE
attention's 1x1 convs to diffusers' Linear layout).
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from pasd_jax.convert.family import LDM_CLIP, LDM_UNET, LDM_VAE, check_sd1
from pasd_jax.convert.io import PathLike, WeightFileError, load_weights, read_json

ASSETS_SD15 = pathlib.Path(__file__).resolve().parents[1] / "assets" / "sd15"
_CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                 "scheduler": "scheduler/scheduler_config.json"}

# Buffers a real SD checkpoint carries that are not model weights: the EMA copy (PASD, like diffusers by default,
# uses the non-EMA weights), the DDPM schedule tensors, the loss `logvar`, CLIP's `position_ids` (an arange).
_NON_WEIGHT = re.compile(r"^(model_ema\..*|betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|"
                         r"log_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights|(.*\.)?position_ids)$")

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TRANSFORMER_INNER = re.compile(r"norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|"
                                r"attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))")
_CLIP_KEY = re.compile(r"text_model\.(embeddings\.(token_embedding|position_embedding)\.weight|"
                       r"encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
                       r"\.(weight|bias)|"
                       r"final_layer_norm\.(weight|bias))")
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MAX_LISTED = 50


class LdmConversionError(WeightFileError):
    """A single-file checkpoint does not fit the SD1.x LDM layout of the given config."""


@dataclasses.dataclass(frozen=True)
class LdmConversion:
    """Diffusers-named PyTorch-layout arrays of one single-file checkpoint.

    `ignored`: non-weight keys that were skipped. `not_converted`: weight keys of components whose config was None.
    """
    unet: dict[str, np.ndarray]
    vae: dict[str, np.ndarray]
    text_encoder: dict[str, np.ndarray]
    ignored: list[str]
    not_converted: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Module:
    target: str  # diffusers module path
    kind: str    # how the suffix below the module is translated: param, resnet, transformer, vae_resnet, vae_attn


# ----------------------------------------------------------------------------------------------------- configs

def sd15_default_config(component: str) -> dict[str, Any]:
    """The SD1.5 config of `unet`, `vae`, `text_encoder` or `scheduler` shipped with the package."""
    if component not in _CONFIG_FILES:
        raise KeyError(f"no default SD1.5 config for {component!r}; known: {sorted(_CONFIG_FILES)}")
    return read_json(ASSETS_SD15 / _CONFIG_FILES[component], what=f"default SD1.5 {component} config")


def base_configs(base: PathLike | None) -> dict[str, dict[str, Any]]:
    """Configs of `unet`, `vae`, `text_encoder` from a diffusers pipeline folder, or the SD1.5 defaults if None."""
    if base is None:
        return {c: sd15_default_config(c) for c in ("unet", "vae", "text_encoder")}
    base = pathlib.Path(base)
    if not base.is_dir():
        raise WeightFileError(f"--base {base} is not a folder: expected a diffusers SD1.x pipeline folder with "
                              "unet/config.json, vae/config.json and text_encoder/config.json")
    return {c: read_json(base / _CONFIG_FILES[c], what=f"{c} config of --base")
            for c in ("unet", "vae", "text_encoder")}


# ----------------------------------------------------------------------------------------------------- tables

def _per_level(value: int | list[int], n: int, name: str) -> list[int]:
    vals = [value] * n if isinstance(value, int) else list(value)
    if len(vals) != n:
        raise LdmConversionError(f"unet config: {name} has {len(vals)} entries for {n} levels")
    return vals


def _unet_table(cfg: Mapping[str, Any]) -> dict[str, _Module]:
    """LDM module path -> diffusers module, following how both UNets enumerate their blocks.

    LDM puts conv_in, then per level `layers` (resnet[, attention]) entries and a downsampler entry (all levels but
    the last) into one `input_blocks` list; `output_blocks` holds `layers + 1` entries per up level, the last one of
    each level (but the last level) ending with the upsampler after the resnet (and attention, if any).
    """
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for t in down:
        if t not in _DOWN_TYPES:
            raise LdmConversionError(f"unet config: down block type {t!r} is not an SD1.x block {sorted(_DOWN_TYPES)}")
    for t in up:
        if t not in _UP_TYPES:
            raise LdmConversionError(f"unet config: up block type {t!r} is not an SD1.x block {sorted(_UP_TYPES)}")
    if cfg.get("use_linear_projection", False):
        raise LdmConversionError("unet config: use_linear_projection=True is the SD2.x layout; SD1.x uses 1x1 convs")
    mid = cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid != "UNetMidBlock2DCrossAttn":
        raise LdmConversionError(f"unet config: mid block {mid!r} is not the SD1.x UNetMidBlock2DCrossAttn")
    layers = _per_level(cfg.get("layers_per_block", 2), len(down), "layers_per_block")

    t: dict[str, _Module] = {
        "time_embed.0": _Module("time_embedding.linear_1", "param"),
        "time_embed.2": _Module("time_embedding.linear_2", "param"),
        "input_blocks.0.0": _Module("conv_in", "param"),
        "middle_block.0": _Module("mid_block.resnets.0", "resnet"),
        "middle_block.1": _Module("mid_block.attentions.0", "transformer"),
        "middle_block.2": _Module("mid_block.resnets.1", "resnet"),
        "out.0": _Module("conv_norm_out", "param"),
        "out.2": _Module("conv_out", "param"),
    }
    idx = 1
    for i, block in enumerate(down):
        for j in range(layers[i]):
            t[f"input_blocks.{idx}.0"] = _Module(f"down_blocks.{i}.resnets.{j}", "resnet")
            if _DOWN_TYPES[block]:
                t[f"input_blocks.{idx}.1"] = _Module(f"down_blocks.{i}.attentions.{j}", "transformer")
            idx += 1
        if i < len(down) - 1:
            t[f"input_blocks.{idx}.0.op"] = _Module(f"down_blocks.{i}.downsamplers.0.conv", "param")
            idx += 1
    up_layers = list(reversed(layers))
    idx = 0
    for i, block in enumerate(up):
        attn = _UP_TYPES[block]
        for j in range(up_layers[i] + 1):
            t[f"output_blocks.{idx}.0"] = _Module(f"up_blocks.{i}.resnets.{j}", "resnet")
            if attn:
                t[f"output_blocks.{idx}.1"] = _Module(f"up_blocks.{i}.attentions.{j}", "transformer")
            if j == up_layers[i] and i < len(up) - 1:
                t[f"output_blocks.{idx}.{2 if attn else 1}.conv"] = _Module(f"up_blocks.{i}.upsamplers.0.conv", "param")
            idx += 1
    return t


def _vae_table(cfg: Mapping[str, Any]) -> dict[str, _Module]:
    """LDM VAE module path -> diffusers; the LDM decoder numbers its levels from the bottom (`up.{n-1-i}`)."""
    n = len(cfg["block_out_channels"])
    layers = int(cfg.get("layers_per_block", 2))
    t: dict[str, _Module] = {}
    for side in ("encoder", "decoder"):
        t[f"{side}.conv_in"] = _Module(f"{side}.conv_in", "param")
        t[f"{side}.conv_out"] = _Module(f"{side}.conv_out", "param")
        t[f"{side}.norm_out"] = _Module(f"{side}.conv_norm_out", "param")
        t[f"{side}.mid.block_1"] = _Module(f"{side}.mid_block.resnets.0", "vae_resnet")
        t[f"{side}.mid.block_2"] = _Module(f"{side}.mid_block.resnets.1", "vae_resnet")
        t[f"{side}.mid.attn_1"] = _Module(f"{side}.mid_block.attentions.0", "vae_attn")
    if cfg.get("use_quant_conv", True):
        t["quant_conv"] = _Module("quant_conv", "param")
    if cfg.get("use_post_quant_conv", True):
        t["post_quant_conv"] = _Module("post_quant_conv", "param")
    for i in range(n):
        for j in range(layers):
            t[f"encoder.down.{i}.block.{j}"] = _Module(f"encoder.down_blocks.{i}.resnets.{j}", "vae_resnet")
        if i < n - 1:
            t[f"encoder.down.{i}.downsample.conv"] = _Module(f"encoder.down_blocks.{i}.downsamplers.0.conv", "param")
        ldm = n - 1 - i
        for j in range(layers + 1):
            t[f"decoder.up.{ldm}.block.{j}"] = _Module(f"decoder.up_blocks.{i}.resnets.{j}", "vae_resnet")
        if i < n - 1:
            t[f"decoder.up.{ldm}.upsample.conv"] = _Module(f"decoder.up_blocks.{i}.upsamplers.0.conv", "param")
    return t


def _clip_expected(cfg: Mapping[str, Any]) -> set[str]:
    keys = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    for i in range(int(cfg["num_hidden_layers"])):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"text_model.encoder.layers.{i}.{m}.weight", f"text_model.encoder.layers.{i}.{m}.bias"}
    return keys


# ----------------------------------------------------------------------------------------------------- mapping

def _translate(mod: _Module, suffix: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Diffusers key and array for `suffix` (below the module), or None if the suffix is not a weight there."""
    sub, _, param = suffix.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if mod.kind == "param":
        return (f"{mod.target}.{param}", value) if not sub else None
    if mod.kind == "resnet":
        name = _UNET_RESNET.get(sub)
    elif mod.kind == "vae_resnet":
        name = _VAE_RESNET.get(sub)
    elif mod.kind == "transformer":
        name = sub if _TRANSFORMER_INNER.fullmatch(sub) else None
    else:  # vae_attn: LDM stores q/k/v/proj_out as 1x1 convs, diffusers as Linear
        name = _VAE_ATTN.get(sub)
        if name and name != "group_norm" and param == "weight" and value.ndim == 4:
            if value.shape[2:] != (1, 1):
                return None
            value = value.reshape(value.shape[:2])
    return (f"{mod.target}.{name}.{param}", value) if name else None


def _map_component(items: Mapping[str, np.ndarray], table: Mapping[str, _Module],
                   out: dict[str, np.ndarray], unmapped: list[str], prefix: str) -> set[str]:
    """Map `items` (keys below `prefix`) through `table`; returns the LDM modules that were seen."""
    seen: set[str] = set()
    for key, value in items.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            mod = table.get(".".join(parts[:n]))
            if mod is not None:
                got = _translate(mod, ".".join(parts[n:]), value)
                break
        else:
            got = None
        if got is None:
            unmapped.append(prefix + key)
            continue
        seen.add(".".join(parts[:n]))
        if got[0] in out:
            raise LdmConversionError(f"two LDM keys map to {got[0]} (the second is {prefix + key})")
        out[got[0]] = got[1]
    return seen


def _map_clip(items: Mapping[str, np.ndarray], out: dict[str, np.ndarray], unmapped: list[str]) -> None:
    # LDM stores transformers' CLIPTextModel state dict under `cond_stage_model.transformer.`; some files lack the
    # `text_model.` level, which is the only difference.
    for key, value in items.items():
        name = key if key.startswith("text_model.") else "text_model." + key
        if _CLIP_KEY.fullmatch(name) is None:
            unmapped.append(LDM_CLIP + key)
            continue
        if name in out:
            raise LdmConversionError(f"two LDM keys map to {name} (the second is {LDM_CLIP + key})")
        out[name] = value


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


# ----------------------------------------------------------------------------------------------------- shapes

def _expect(out: Mapping[str, np.ndarray], key: str, shape: tuple[int | None, ...], errors: list[str]) -> None:
    v = out.get(key)
    if v is None:
        return
    if len(v.shape) != len(shape) or any(e is not None and e != s for e, s in zip(shape, v.shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        errors.append(f"{key}: {list(v.shape)}, config implies {want}")


def _check_unet(out: Mapping[str, np.ndarray], cfg: Mapping[str, Any], errors: list[str]) -> None:
    ch = list(cfg["block_out_channels"])
    k_in, k_out = cfg.get("conv_in_kernel", 3), cfg.get("conv_out_kernel", 3)
    _expect(out, "conv_in.weight", (ch[0], cfg.get("in_channels", 4), k_in, k_in), errors)
    _expect(out, "conv_out.weight", (cfg.get("out_channels", 4), ch[0], k_out, k_out), errors)
    _expect(out, "time_embedding.linear_1.weight", (cfg.get("time_embedding_dim") or 4 * ch[0], ch[0]), errors)
    cross = cfg.get("cross_attention_dim", 1280)
    rch = list(reversed(ch))
    for key in out:
        m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.\d+\.conv1\.weight$", key)
        if m:
            c = (ch if m.group(1) == "down" else rch)[int(m.group(2))]
            _expect(out, key, (c, None, 3, 3), errors)
        elif key.startswith("mid_block.resnets.") and key.endswith(".conv1.weight"):
            _expect(out, key, (ch[-1], ch[-1], 3, 3), errors)
        elif isinstance(cross, int) and re.search(r"attn2\.to_[kv]\.weight$", key):
            _expect(out, key, (None, cross), errors)


def _check_vae(out: Mapping[str, np.ndarray], cfg: Mapping[str, Any], errors: list[str]) -> None:
    ch, lat = list(cfg["block_out_channels"]), cfg.get("latent_channels", 4)
    _expect(out, "encoder.conv_in.weight", (ch[0], cfg.get("in_channels", 3), 3, 3), errors)
    _expect(out, "encoder.conv_out.weight", (2 * lat, ch[-1], 3, 3), errors)
    _expect(out, "decoder.conv_in.weight", (ch[-1], lat, 3, 3), errors)
    _expect(out, "decoder.conv_out.weight", (cfg.get("out_channels", 3), ch[0], 3, 3), errors)
    rch = list(reversed(ch))
    for key in out:
        m = re.match(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.resnets\.\d+\.conv1\.weight$", key)
        if m:
            c = (ch if m.group(1) == "encoder.down" else rch)[int(m.group(2))]
            _expect(out, key, (c, None, 3, 3), errors)


def _check_clip(out: Mapping[str, np.ndarray], cfg: Mapping[str, Any], errors: list[str]) -> None:
    h = cfg["hidden_size"]
    _expect(out, "text_model.embeddings.token_embedding.weight", (cfg["vocab_size"], h), errors)
    _expect(out, "text_model.embeddings.position_embedding.weight", (cfg["max_position_embeddings"], h), errors)
    for key in out:
        if key.endswith("mlp.fc1.weight"):
            _expect(out, key, (cfg["intermediate_size"], h), errors)
        elif key.endswith("self_attn.q_proj.weight"):
            _expect(out, key, (h, h), errors)


# ----------------------------------------------------------------------------------------------------- public

def ldm_to_diffusers(state: Mapping[str, np.ndarray], *, unet_config: Mapping[str, Any],
                     vae_config: Mapping[str, Any] | None, text_config: Mapping[str, Any] | None,
                     what: str = "single-file checkpoint") -> LdmConversion:
    """Convert an SD1.x LDM state dict to diffusers UNet / VAE and transformers `text_model.*` names.

    A component whose config is None is not converted (its keys are listed in `not_converted`). Raises
    `ModelFamilyError` for another model family and `LdmConversionError` for unmapped or missing keys or shapes
    that contradict the configs.
    """
    fam = check_sd1(state, what=what)
    if fam.layout != "ldm":
        raise LdmConversionError(f"{what}: found {fam.evidence} ({fam.layout} layout); expected an original-LDM "
                                 f"single-file checkpoint (`{LDM_UNET}*` keys). A LoRA is merged, not converted")
    groups: dict[str, dict[str, np.ndarray]] = {LDM_UNET: {}, LDM_VAE: {}, LDM_CLIP: {}}
    ignored, unmapped = [], []
    for key, value in state.items():
        if _NON_WEIGHT.match(key):
            ignored.append(key)
            continue
        for prefix, group in groups.items():
            if key.startswith(prefix):
                group[key[len(prefix):]] = value
                break
        else:
            unmapped.append(key)

    unet: dict[str, np.ndarray] = {}
    vae: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    not_converted: list[str] = []
    missing: list[str] = []
    table = _unet_table(unet_config)
    seen = _map_component(groups[LDM_UNET], table, unet, unmapped, LDM_UNET)
    missing += [LDM_UNET + m for m in table if m not in seen]
    if vae_config is None:
        not_converted += [LDM_VAE + k for k in groups[LDM_VAE]]
    else:
        table = _vae_table(vae_config)
        seen = _map_component(groups[LDM_VAE], table, vae, unmapped, LDM_VAE)
        missing += [LDM_VAE + m for m in table if m not in seen]
    if text_config is None:
        not_converted += [LDM_CLIP + k for k in groups[LDM_CLIP]]
    else:
        _map_clip(groups[LDM_CLIP], text, unmapped)
        expected = _clip_expected(text_config)
        missing += [LDM_CLIP + k for k in sorted(expected - set(text))]
        unmapped += [LDM_CLIP + k for k in sorted(set(text) - expected)]

    if unmapped:
        raise LdmConversionError(f"{what}: {len(unmapped)} key(s) are not SD1.x LDM weights of this config and not "
                                 f"known non-weight buffers: {_listed(unmapped)}")
    if missing:
        raise LdmConversionError(f"{what}: {len(missing)} module(s) that the config requires are missing: "
                                 f"{_listed(missing)}")
    errors: list[str] = []
    _check_unet(unet, unet_config, errors)
    if vae_config is not None:
        _check_vae(vae, vae_config, errors)
    if text_config is not None:
        _check_clip(text, text_config, errors)
    if errors:
        raise LdmConversionError(f"{what}: {len(errors)} tensor shape(s) contradict the config (wrong --base?): "
                                 f"{_listed(errors)}")
    return LdmConversion(unet, vae, text, ignored, not_converted)


def load_single_file(path: PathLike, base: PathLike | None = None) -> LdmConversion:
    """Read an LDM single file (`.safetensors`; `.ckpt` needs the torch extra) and convert it.

    Configs come from the diffusers folder `base` or the shipped SD1.5 defaults. A file without VAE or text-encoder
    weights (some pruned files) converts to an empty dict for that component, so the caller keeps its own.
    """
    state = load_weights(path)
    if not state:
        raise WeightFileError(f"{path} holds no tensors")
    check_sd1(state, what=str(path))
    cfg = base_configs(base)
    has_vae = any(k.startswith(LDM_VAE) for k in state)
    has_text = any(k.startswith(LDM_CLIP) and not _NON_WEIGHT.match(k) for k in state)
    return ldm_to_diffusers(state, unet_config=cfg["unet"], vae_config=cfg["vae"] if has_vae else None,
                            text_config=cfg["text_encoder"] if has_text else None, what=str(path))
