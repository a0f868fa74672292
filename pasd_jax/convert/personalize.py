"""Personalized models at the Flax level: swap the SD base of a trained PASD UNet, or merge a LoRA into it.

PASD's stylization keeps the trained PACA layers and the ControlNet and replaces only the SD1.x base weights with a
personalized model's (a civitai single file, a diffusers folder, a bare UNet folder or weight file), blended as
`alpha * new + (1 - alpha) * current` like the official `load_dreambooth_lora`. The official folder swap rebuilds the
UNet and re-randomises PACA (spec appendix A8); here the new weights are converted against the shapes of the
current SD keys only, so PACA can never be touched and a model of another architecture fails on shapes.

As in the official code, `alpha` blends the UNet; a VAE or text encoder, when given and present in the source, is
replaced outright. LoRAs (kohya, diffusers, PEFT, LyCORIS; one or several, each with its multiplier) are fused by
`lora_params` into just the tensors they target, with either rule: `alpha_scaled` (diffusers/kohya) or `official`
(PASD's, alpha ignored). Inputs are never modified; untouched leaves are returned as the same objects.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from pasd_jax.convert.base import check_family, weight_file_shapes
from pasd_jax.convert.blend import BlendError, blend_weights, is_paca_key
from pasd_jax.convert.cache import ConversionCache, cached, config_digest, resolve_cache
from pasd_jax.convert.family import detect_layout
from pasd_jax.convert.folders import DIFFUSERS_STEMS, TEXT_ENCODER, TRANSFORMERS_STEMS, UNET, VAE, style_of
from pasd_jax.convert.io import PathLike, WeightFileError, find_weight_file, load_weights
from pasd_jax.convert.ldm import ldm_to_diffusers
from pasd_jax.convert.lora import LoraSpec, as_spec, parse_lora
from pasd_jax.convert.lora_fuse import check_rule
from pasd_jax.convert.lora_params import LoraFusion, fuse_lora_files, fuse_loras
from pasd_jax.convert.naming import torch_key
from pasd_jax.convert.tree import torch_to_flax

log = logging.getLogger(__name__)
Model = tuple[Any, Any]  # (Flax module, params)
SINGLE_FILE, DIFFUSERS_FOLDER, UNET_FOLDER, UNET_FILE, LORA = (
    "single_file", "diffusers_folder", "unet_folder", "unet_file", "lora")


@dataclasses.dataclass(frozen=True)
class PersonalizeReport:
    """What a swap or merge did: PyTorch-named keys per component, and what was left alone."""
    source: str
    source_kind: str
    replaced: Mapping[str, tuple[str, ...]]
    kept: tuple[str, ...] = ()          # PASD-only UNet keys (PACA / pasd_light) left as they were
    ignored: tuple[str, ...] = ()       # source keys that are not weights of the target (reported, not used)
    not_in_source: tuple[str, ...] = ()  # components asked for that the source does not have (kept as they were)
    alpha: float | None = None
    multiplier: float | None = None
    rule: str | None = None

    def summary(self) -> str:
        how = (f", alpha={self.alpha}" if self.alpha is not None else
               f", multiplier={self.multiplier}, rule={self.rule}" if self.multiplier is not None else "")
        parts = [f"{comp}: {len(keys)} tensor(s)" for comp, keys in self.replaced.items()]
        text = f"{self.source} ({self.source_kind}{how}): changed {', '.join(parts) or 'nothing'}"
        if self.kept:
            text += f"; kept {len(self.kept)} PASD-only UNet tensor(s)"
        if self.not_in_source:
            text += f"; not in the source, kept: {', '.join(self.not_in_source)}"
        if self.ignored:
            text += f"; ignored {len(self.ignored)} key(s)"
        return text


@dataclasses.dataclass(frozen=True)
class Personalized:
    """New param trees (None where the component was not given) and the report."""
    unet: Any
    vae: Any | None
    text_encoder: Any | None
    report: PersonalizeReport


# ------------------------------------------------------------------------------------------ helpers

def _named(params: Any, kind: str) -> dict[str, tuple[str, ...]]:
    """PyTorch key -> Flax path for every leaf."""
    return {torch_key(p, style_of(kind)): p for p in flatten_dict(params)}


def _target_abstract(params: Any, kind: str) -> tuple[dict, list[str]]:
    """Shapes the source must provide (float32; the UNet's PASD-only keys excluded) and those excluded keys."""
    keep, excluded = {}, []
    for path, leaf in flatten_dict(params).items():
        if kind == UNET and is_paca_key(torch_key(path, style_of(kind))):
            excluded.append(torch_key(path, style_of(kind)))
        else:
            keep[path] = jax.ShapeDtypeStruct(tuple(np.shape(leaf)), jnp.float32)
    return unflatten_dict(keep), sorted(excluded)


def _convert_into(cache: ConversionCache | None, sources: list[pathlib.Path], tag: Mapping[str, Any],
                  load_state: Callable[[], tuple[Mapping[str, np.ndarray], list[str]]], target: Any, kind: str,
                  what: str) -> tuple[Any, list[str]]:
    """Strictly convert a PyTorch-named dict onto the target's shapes (PACA excluded), through the cache."""
    abstract, _ = _target_abstract(target, kind)
    shapes = sorted((("/".join(p)), tuple(l.shape)) for p, l in flatten_dict(abstract).items())
    tag = {**tag, "kind": kind, "target": config_digest(shapes)}

    def convert():
        state, ignored = load_state()
        skip = [k for k in state if k.endswith("position_ids") or (kind == UNET and is_paca_key(k))]
        params = torch_to_flax(state, abstract, style=style_of(kind), what=what,
                               ignore=set(skip).__contains__, dtype=np.float32)
        return params, {"kind": kind, "ignored": sorted(set(ignored) | set(skip))}

    params, meta = cached(cache, sources, tag, convert)
    return params, list(meta.get("ignored", []))


def swap_params(current: Any, new: Any, kind: str, alpha: float = 1.0, *, what: str = "personalized model"
                ) -> tuple[Any, list[str], list[str]]:
    """Blend `new` (every non-PASD-only key of `current`, same paths) into `current`.

    Returns (params, replaced PyTorch keys, kept PASD-only keys). Replaced leaves become jax arrays in the current
    dtype (bit for bit the new values at alpha == 1); all other leaves are the input objects.
    """
    cur_named, new_named = _named(current, kind), _named(new, kind)
    kept = sorted(k for k in cur_named if kind == UNET and is_paca_key(k))
    want = set(cur_named) - set(kept)
    missing = sorted(want - set(new_named))
    if missing:
        raise BlendError(f"{what} lacks {len(missing)} SD key(s) of the model: {', '.join(missing[:20])}")
    flat_cur, flat_new = flatten_dict(current), flatten_dict(new)
    cur = {k: np.asarray(flat_cur[cur_named[k]]) for k in want}
    nxt = {k: np.asarray(flat_new[new_named[k]]) for k in new_named}
    out, replaced = blend_weights(cur, nxt, alpha, what=what)
    result = dict(flat_cur)
    for k in replaced:
        result[cur_named[k]] = jnp.asarray(out[k])
    return unflatten_dict(result), sorted(replaced), kept


# ------------------------------------------------------------------------------------------ sources

def source_kind(source: PathLike) -> str:
    """single_file | diffusers_folder | unet_folder | unet_file | lora, from the path and the key layout."""
    src = pathlib.Path(source)
    if src.is_dir():
        if (src / "unet" / "config.json").is_file():
            return DIFFUSERS_FOLDER
        if (src / "config.json").is_file():
            return UNET_FOLDER
        raise WeightFileError(f"personalized model folder {src}: expected a diffusers SD1.x folder (unet/ ...) or "
                              "a UNet folder (config.json + diffusion_pytorch_model.safetensors)")
    if not src.is_file():
        raise WeightFileError(f"personalized model {src} does not exist")
    layout = detect_layout(weight_file_shapes(src))
    kinds = {"ldm": SINGLE_FILE, "kohya_lora": LORA, "peft_lora": LORA, "diffusers_unet": UNET_FILE}
    if layout not in kinds:
        raise WeightFileError(f"{src}: not a Stable Diffusion 1.x single file, UNet state dict or kohya LoRA "
                              "(no known key layout)")
    return kinds[layout]


def _module_config(model: Model | None) -> dict | None:
    return None if model is None else model[0].config.to_dict()


def swap_base(source: PathLike, *, unet: Model, vae: Model | None = None, text_encoder: Model | None = None,
              alpha: float = 1.0, cache: "ConversionCache | PathLike | bool | None" = None) -> Personalized:
    """Replace the SD base of a PASD UNet (and the VAE / text encoder, if given) with a personalized model's.

    `source`: an LDM single file, a diffusers SD1.x folder, a UNet folder or a diffusers UNet weight file.
    PACA / pasd_light tensors are kept; every SD tensor must be provided with the model's shape.
    """
    src = pathlib.Path(source)
    kind = source_kind(src)
    if kind == LORA:
        raise WeightFileError(f"{src} is a LoRA: merge it with apply_lora (or personalize), it has no base weights")
    store = resolve_cache(cache)
    targets = {UNET: unet, VAE: vae, TEXT_ENCODER: text_encoder}
    converted: dict[str, tuple[Any, list[str]]] = {}
    not_in_source: list[str] = []
    if kind == SINGLE_FILE:
        shapes = check_family(src)
        prefixes = {UNET: "model.diffusion_model.", VAE: "first_stage_model.",
                    TEXT_ENCODER: "cond_stage_model.transformer."}
        present = {c: any(k.startswith(p) and not k.endswith("position_ids") for k in shapes)
                   for c, p in prefixes.items()}
        not_in_source = [c for c, m in targets.items() if m is not None and not present[c]]
        cfg = {c: _module_config(m) if present[c] else None for c, m in targets.items()}

        @functools.lru_cache(maxsize=1)
        def ldm():
            return ldm_to_diffusers(load_weights(src), unet_config=cfg[UNET], vae_config=cfg[VAE],
                                    text_config=cfg[TEXT_ENCODER], what=str(src))

        for comp, model in targets.items():
            if model is None or not present[comp]:
                continue
            converted[comp] = _convert_into(
                store, [src], {"op": "swap", "component": comp, "config": config_digest(cfg[comp])},
                lambda comp=comp: (getattr(ldm(), comp), ldm().ignored), model[1], comp, f"{comp} of {src}")
    else:
        folders = ({UNET: src / "unet", VAE: src / "vae", TEXT_ENCODER: src / "text_encoder"}
                   if kind == DIFFUSERS_FOLDER else {UNET: src})
        for comp, model in targets.items():
            if model is None:
                continue
            where = folders.get(comp)
            if where is None or not where.exists():
                not_in_source.append(comp)
                continue
            weights = where if where.is_file() else find_weight_file(
                where, TRANSFORMERS_STEMS if comp == TEXT_ENCODER else DIFFUSERS_STEMS)
            if comp == UNET and weights.suffix == ".safetensors":
                check_family(weights)
            converted[comp] = _convert_into(
                store, [weights], {"op": "swap", "component": comp},
                lambda weights=weights: (load_weights(weights), []), model[1], comp, f"{comp} weights {weights}")
    if UNET in not_in_source:
        raise WeightFileError(f"{src} has no UNet weights to swap in")
    out: dict[str, Any] = {}
    replaced: dict[str, tuple[str, ...]] = {}
    kept: list[str] = []
    ignored: set[str] = set()
    for comp, (params, ign) in converted.items():
        a = alpha if comp == UNET else 1.0
        out[comp], keys, k = swap_params(targets[comp][1], params, comp, a, what=f"{comp} of {src}")
        replaced[comp] = tuple(keys)
        kept += k
        ignored |= set(ign)
    report = PersonalizeReport(str(src), kind, replaced, tuple(kept), tuple(sorted(ignored)), tuple(not_in_source),
                               alpha=alpha)
    log.info("personalized: %s", report.summary())
    return Personalized(unet=out[UNET], vae=out.get(VAE, None if vae is None else vae[1]),
                        text_encoder=out.get(TEXT_ENCODER, None if text_encoder is None else text_encoder[1]),
                        report=report)


# ------------------------------------------------------------------------------------------ LoRA

def _lora_result(fused: LoraFusion, source: str, multiplier: float | None, rule: str | None) -> Personalized:
    report = PersonalizeReport(source, LORA, dict(fused.replaced), ignored=fused.skipped, multiplier=multiplier,
                               rule=rule)
    log.info("LoRA %s: %s", "fused weights from the cache" if fused.from_cache else "merged", report.summary())
    return Personalized(unet=fused.unet, vae=None, text_encoder=fused.text_encoder, report=report)


def _params(model: Model | None) -> Any:
    return None if model is None else model[1]


def merge_lora_params(lora: Mapping[str, np.ndarray], *, unet: Model | None = None,
                      text_encoder: Model | None = None, multiplier: float = 1.0, rule: str = "alpha_scaled",
                      metadata: Mapping[str, str] | None = None, what: str = "LoRA") -> Personalized:
    """Merge a LoRA state dict (kohya, diffusers, PEFT or LyCORIS names) into Flax UNet / text-encoder params."""
    check_rule(rule)
    parsed = parse_lora(lora, metadata=metadata, what=what)
    fused = fuse_lora_files([(parsed, multiplier, rule)], unet=_params(unet), text_encoder=_params(text_encoder))
    return _lora_result(fused, what, multiplier, rule)


def apply_loras(loras: Sequence["LoraSpec | tuple | PathLike"], *, unet: Model | None = None,
                text_encoder: Model | None = None, cache: "ConversionCache | PathLike | bool | None" = None,
                base_id: Any = None) -> Personalized:
    """Fuse several LoRA files / folders in order, each with its own multiplier and rule.

    `loras`: `LoraSpec(path, multiplier, rule)`, `(path, multiplier)` or `(path, multiplier, rule)`. The fused
    tensors go through the conversion cache (`cache` as for `load_checkpoint`: None = the default cache, False =
    off), keyed by `base_id` (what identifies the base params, e.g. the checkpoint's cache key plus any swap; if
    None, a hash of the targeted base tensors), the LoRAs' content hashes, multipliers and rules.
    """
    specs = [as_spec(item) for item in loras]
    fused = fuse_loras(specs, unet=_params(unet), text_encoder=_params(text_encoder), cache=resolve_cache(cache),
                       base_id=base_id)
    one = specs[0] if len(specs) == 1 else None
    source = " + ".join(s.describe() for s in specs) if one is None else str(one.path)
    return _lora_result(fused, source, one and one.multiplier, one and one.rule)


def apply_lora(source: PathLike, *, unet: Model | None = None, text_encoder: Model | None = None,
               multiplier: float = 1.0, rule: str = "alpha_scaled",
               cache: "ConversionCache | PathLike | bool | None" = False, base_id: Any = None) -> Personalized:
    """One LoRA file or folder (any supported format); `apply_loras` with one entry, uncached unless asked."""
    return apply_loras([LoraSpec(source, multiplier, rule)], unet=unet, text_encoder=text_encoder, cache=cache,
                       base_id=base_id)


def personalize(source: PathLike, *, unet: Model, vae: Model | None = None, text_encoder: Model | None = None,
                alpha: float = 1.0, multiplier: float = 1.0, rule: str = "alpha_scaled",
                cache: "ConversionCache | PathLike | bool | None" = None) -> Personalized:
    """What `sample.py --personalized` calls: a LoRA file is merged, anything else swaps the SD base."""
    if source_kind(source) == LORA:
        got = apply_lora(source, unet=unet, text_encoder=text_encoder, multiplier=multiplier, rule=rule)
        return dataclasses.replace(got, vae=None if vae is None else vae[1])
    return swap_base(source, unet=unet, vae=vae, text_encoder=text_encoder, alpha=alpha, cache=cache)


__all__ = ["Personalized", "PersonalizeReport", "apply_lora", "apply_loras", "merge_lora_params", "personalize", "source_kind",
           "swap_base", "swap_params"]
