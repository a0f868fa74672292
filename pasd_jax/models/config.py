"""Model configs parsed from diffusers / transformers `config.json` files.

Each config is a frozen dataclass (hashable, so a Flax module can hold it) that keeps the original JSON text: export
writes back exactly the file that was loaded, and unsupported options fail here, before any tracing, with a message
that says which key is the problem.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


from pasd_jax.errors import ConfigError  # noqa: E402  (a model config asks for something we do not have)


def _tuple(v: Any, n: int, name: str) -> tuple:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ConfigError(f"{name} has {len(v)} entries but the model has {n} blocks")
        return tuple(v)
    return (v,) * n


def _require(cfg: Mapping[str, Any], key: str, allowed: tuple, what: str) -> None:
    if cfg.get(key, allowed[0]) not in allowed:
        raise ConfigError(f"{what}: config.json sets {key}={cfg[key]!r}; pasd-jax supports {allowed}")


def _check_sd_common(cfg: Mapping[str, Any], what: str) -> None:
    """Options of SD1.x-family UNet/ControlNet configs; anything else (SDXL, class embeddings, ...) is refused."""
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type",
                "num_class_embeds", "time_cond_proj_dim", "time_embedding_dim", "time_embedding_act_fn",
                "timestep_post_act", "projection_class_embeddings_input_dim"):
        _require(cfg, key, (None,), what)
    _require(cfg, "act_fn", ("silu",), what)
    _require(cfg, "resnet_time_scale_shift", ("default",), what)
    _require(cfg, "time_embedding_type", ("positional",), what)
    _require(cfg, "mid_block_scale_factor", (1, 1.0), what)
    _require(cfg, "conv_in_kernel", (3,), what)
    _require(cfg, "conv_out_kernel", (3,), what)
    _require(cfg, "attention_type", ("default",), what)
    _require(cfg, "dual_cross_attention", (False,), what)
    _require(cfg, "resnet_skip_time_act", (False,), what)
    _require(cfg, "resnet_out_scale_factor", (1, 1.0), what)
    _require(cfg, "center_input_sample", (False,), what)
    _require(cfg, "cross_attention_norm", (None,), what)
    _require(cfg, "mid_block_type", ("UNetMidBlock2DCrossAttn",), what)
    if isinstance(cfg.get("cross_attention_dim", 768), (list, tuple)):
        raise ConfigError(f"{what}: per-block cross_attention_dim lists are not supported")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    heads: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]
    in_channels: int = 4
    out_channels: int = 4
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    sample_size: int = 64
    raw: str = "{}"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], what: str = "UNet") -> "UNetConfig":
        _check_sd_common(cfg, what)
        down = tuple(cfg.get("down_block_types", ()))
        up = tuple(cfg.get("up_block_types", ()))
        n = len(down)
        if not n or len(up) != n:
            raise ConfigError(f"{what}: down_block_types and up_block_types must be non-empty and equally long")
        for t in down:
            if t not in DOWN_TYPES:
                raise ConfigError(f"{what}: unsupported down block type {t!r}; supported: {DOWN_TYPES}")
        for t in up:
            if t not in UP_TYPES:
                raise ConfigError(f"{what}: unsupported up block type {t!r}; supported: {UP_TYPES}")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        channels = tuple(int(c) for c in cfg["block_out_channels"])
        if len(channels) != n:
            raise ConfigError(f"{what}: block_out_channels has {len(channels)} entries for {n} blocks")
        return cls(
            down_block_types=down, up_block_types=up, block_out_channels=channels,
            layers_per_block=tuple(int(x) for x in _tuple(cfg.get("layers_per_block", 2), n, "layers_per_block")),
            heads=tuple(int(x) for x in _tuple(heads, n, "attention_head_dim")),
            transformer_layers_per_block=tuple(
                int(x) for x in _tuple(cfg.get("transformer_layers_per_block", 1), n,
                                       "transformer_layers_per_block")),
            only_cross_attention=tuple(bool(x) for x in _tuple(cfg.get("only_cross_attention", False), n,
                                                               "only_cross_attention")),
            in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
            cross_attention_dim=int(cfg.get("cross_attention_dim", 768)),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)), norm_eps=float(cfg.get("norm_eps", 1e-5)),
            downsample_padding=int(cfg.get("downsample_padding", 1)), sample_size=int(cfg.get("sample_size", 64)),
            raw=json.dumps(dict(cfg), sort_keys=False))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.raw)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"
    use_rrdb: bool = False
    rgb_heads: bool = True  # PASD's degradation-removal `to_rgbs`; absent in a plain diffusers ControlNet
    raw: str = "{}"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ControlNetConfig":
        what = "ControlNet"
        base = dict(cfg)
        # The ControlNet config carries no up blocks; mirror the down path so the shared parser can validate it.
        down = base.get("down_block_types", [])
        base.setdefault("up_block_types", ["UpBlock2D" if t == "DownBlock2D" else "CrossAttnUpBlock2D"
                                           for t in reversed(down)])
        _require(cfg, "global_pool_conditions", (False,), what)
        _require(cfg, "controlnet_conditioning_channel_order", ("rgb", "bgr"), what)
        return cls(unet=UNetConfig.from_dict(base, what),
                   conditioning_channels=int(cfg.get("conditioning_channels", 3)),
                   conditioning_embedding_out_channels=tuple(
                       int(c) for c in cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                   channel_order=cfg.get("controlnet_conditioning_channel_order", "rgb"),
                   use_rrdb=bool(cfg.get("use_rrdb", False)),
                   rgb_heads=bool(cfg.get("return_rgbs", True)),
                   raw=json.dumps(dict(cfg)))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.raw)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    raw: str = "{}"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        what = "AutoencoderKL"
        for t in cfg.get("down_block_types", ["DownEncoderBlock2D"]):
            if t != "DownEncoderBlock2D":
                raise ConfigError(f"{what}: unsupported down block type {t!r}")
        for t in cfg.get("up_block_types", ["UpDecoderBlock2D"]):
            if t != "UpDecoderBlock2D":
                raise ConfigError(f"{what}: unsupported up block type {t!r}")
        _require(cfg, "act_fn", ("silu",), what)
        if cfg.get("latents_mean") is not None or cfg.get("shift_factor") is not None:
            raise ConfigError(f"{what}: latents_mean/shift_factor (SD3/Flux-style VAEs) are not supported")
        return cls(block_out_channels=tuple(int(c) for c in cfg.get("block_out_channels", (128, 256, 512, 512))),
                   layers_per_block=int(cfg.get("layers_per_block", 2)),
                   in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
                   latent_channels=int(cfg.get("latent_channels", 4)),
                   norm_num_groups=int(cfg.get("norm_num_groups", 32)),
                   scaling_factor=float(cfg.get("scaling_factor") or 0.18215),
                   use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                   use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
                   raw=json.dumps(dict(cfg)))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.raw)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    raw: str = "{}"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
        if "text_config" in cfg:  # a full CLIPModel config: take its text tower
            cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k != "text_config"}}
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"CLIP text encoder: unsupported hidden_act {act!r}")
        return cls(vocab_size=int(cfg.get("vocab_size", 49408)), hidden_size=int(cfg.get("hidden_size", 768)),
                   intermediate_size=int(cfg.get("intermediate_size", 3072)),
                   num_hidden_layers=int(cfg.get("num_hidden_layers", 12)),
                   num_attention_heads=int(cfg.get("num_attention_heads", 12)),
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 77)), hidden_act=act,
                   layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), raw=json.dumps(dict(cfg)))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.raw)


def controlnet_config_from_unet(unet_config: Mapping[str, Any], *, use_rrdb: bool = False,
                                conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                                return_rgbs: bool = True) -> dict[str, Any]:
    """A complete PASD ControlNet config for a UNet config, with the keys training writes (as `from_unet`)."""
    shared = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
              "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
              "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
              "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
              "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
              "projection_class_embeddings_input_dim")
    defaults = dict(in_channels=4, flip_sin_to_cos=True, freq_shift=0, only_cross_attention=False,
                    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
                    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
                    encoder_hid_dim=None, encoder_hid_dim_type=None, attention_head_dim=8,
                    num_attention_heads=None, use_linear_projection=False, class_embed_type=None,
                    addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
                    upcast_attention=False, resnet_time_scale_shift="default",
                    projection_class_embeddings_input_dim=None)
    cfg: dict[str, Any] = {"_class_name": "ControlNetModel", "_diffusers_version": "0.29.2"}
    for key in shared:
        if key in unet_config or key in defaults:
            cfg[key] = unet_config.get(key, defaults.get(key))
    cfg.update(conditioning_channels=3, controlnet_conditioning_channel_order="rgb",
               conditioning_embedding_out_channels=list(conditioning_embedding_out_channels),
               global_pool_conditions=False, addition_embed_type_num_heads=64, return_rgbs=return_rgbs,
               use_rrdb=use_rrdb)
    return cfg
