"""Merging SD1.x LoRAs (kohya, diffusers, PEFT, LyCORIS LoHa/LoKr) into PyTorch-named UNet / CLIP state dicts.

PASD stylizes with civitai LoRAs merged into the base weights, and its `--use_lcm_lora` fuses an LCM-LoRA through
diffusers. Reading the formats is `lora_formats`; the scaling rules of each format (`official` = PASD's merge,
alpha ignored; `alpha_scaled` = diffusers 0.29.2 / kohya / PEFT / LyCORIS) and the update math are `lora_fuse`.
Every module must resolve to exactly one target weight of a fitting shape, or the merge fails naming it; kohya's
ambiguous `_`-joined names are looked up in the target's own module paths, so they resolve exactly or not at all.
Deltas are computed in float32 (LoRA files are usually float16) and the result is cast back to the target dtype.
Several LoRAs are applied one after another, each with its own multiplier (as diffusers fuses several adapters).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Sequence

import numpy as np

from pasd_jax.convert.io import PathLike
from pasd_jax.convert.lora_formats import (TEXT_ENCODER, TEXT_PREFIX, UNET, UNET_PREFIX, LoraError, LoraFile,
                                           LoraModule, parse_lora, read_lora)
from pasd_jax.convert.lora_fuse import RULES, apply_plan, check_rule, module_delta, module_index, module_scales, \
    plan_merge

DEFAULT_RULE = "alpha_scaled"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a file or folder, its multiplier (diffusers' `lora_scale`, PASD's `--multiplier`) and
    the scaling rule (`official` is PASD's merge of kohya files; the LCM-LoRA path always uses `alpha_scaled`)."""
    path: PathLike
    multiplier: float = 1.0
    rule: str = DEFAULT_RULE

    def describe(self) -> str:
        return f"{self.path} (x{self.multiplier:g}, {self.rule})"


def as_spec(item: "LoraSpec | tuple | PathLike", rule: str = DEFAULT_RULE) -> LoraSpec:
    """A `LoraSpec` from a spec, `(path, multiplier)`, `(path, multiplier, rule)` or a bare path (multiplier 1)."""
    if isinstance(item, LoraSpec):
        spec = item
    elif isinstance(item, tuple):
        spec = LoraSpec(*item) if len(item) == 3 else LoraSpec(item[0], float(item[1]), rule)
    else:
        spec = LoraSpec(item, 1.0, rule)
    check_rule(spec.rule)
    return spec


def parse_lora_arg(text: str, *, default_multiplier: float = 1.0, rule: str = DEFAULT_RULE) -> LoraSpec:
    """`PATH[:WEIGHT]` as given to `--lora` (a tail that is not a number stays part of the path)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return LoraSpec(path, float(tail), rule)
        except ValueError:
            pass
    if not text:
        raise ValueError("--lora needs a path: --lora PATH[:WEIGHT]")
    return LoraSpec(text, default_multiplier, rule)


def lcm_lora_spec(path: PathLike) -> LoraSpec:
    """What `test_pasd.py --use_lcm_lora` does: `load_lora_weights(path)` + `fuse_lora()` (lora_scale 1.0)."""
    return LoraSpec(path, 1.0, "alpha_scaled")


@dataclasses.dataclass(frozen=True)
class LoraMerge:
    """Merged copies of the target dicts; `changed` lists `unet.<key>` / `text_encoder.<key>` that were updated,
    `skipped` the LoRA modules of a component that was not given (None)."""
    unet: dict[str, np.ndarray] | None
    text_encoder: dict[str, np.ndarray] | None
    changed: list[str]
    skipped: list[str]


def merge_lora_files(loras: Sequence[tuple[LoraFile, float, str]], *,
                     unet: Mapping[str, np.ndarray] | None = None,
                     text_encoder: Mapping[str, np.ndarray] | None = None) -> LoraMerge:
    """Merge parsed LoRAs `(file, multiplier, rule)` in order into diffusers UNet / `text_model.*` CLIP dicts.

    All-or-nothing: every module of every LoRA is resolved and shape-checked before anything is merged. Inputs are
    not modified; untouched entries are returned as the same objects.
    """
    targets = {UNET: unet, TEXT_ENCODER: text_encoder}
    shapes = {c: (None if d is None else {k: tuple(np.shape(v)) for k, v in d.items()}) for c, d in targets.items()}
    plans, skipped = [], []
    for lora, multiplier, rule in loras:
        plan, skip = plan_merge(lora, shapes, multiplier=multiplier, rule=rule)
        plans += plan
        skipped += skip
    work = {c: {} for c in targets}
    for step in plans:
        work[step.component].setdefault(step.key, targets[step.component][step.key])
    apply_plan(plans, work)
    out = {c: (None if d is None else dict(d)) for c, d in targets.items()}
    changed = []
    for comp, fused in work.items():
        for key, value in fused.items():
            out[comp][key] = value.astype(np.asarray(targets[comp][key]).dtype)
            changed.append(f"{comp}.{key}")
    return LoraMerge(out[UNET], out[TEXT_ENCODER], changed, skipped)


def merge_lora(lora: Mapping[str, np.ndarray], *, unet: Mapping[str, np.ndarray] | None = None,
               text_encoder: Mapping[str, np.ndarray] | None = None, multiplier: float = 1.0,
               rule: str = DEFAULT_RULE, metadata: Mapping[str, str] | None = None,
               what: str = "LoRA") -> LoraMerge:
    """Merge one LoRA state dict (any supported format) into diffusers UNet / `text_model.*` CLIP dicts."""
    check_rule(rule)
    parsed = parse_lora(lora, metadata=metadata, what=what)
    return merge_lora_files([(parsed, multiplier, rule)], unet=unet, text_encoder=text_encoder)


def merge_lora_file(path: PathLike, *, unet: Mapping[str, np.ndarray] | None = None,
                    text_encoder: Mapping[str, np.ndarray] | None = None, multiplier: float = 1.0,
                    rule: str = DEFAULT_RULE) -> LoraMerge:
    """`merge_lora` on a LoRA file or folder (kohya metadata helps refuse SD2/SDXL LoRAs; a PEFT
    `adapter_config.json` beside the weights supplies `lora_alpha`)."""
    check_rule(rule)
    return merge_lora_files([(read_lora(pathlib.Path(path)), multiplier, rule)], unet=unet,
                            text_encoder=text_encoder)


__all__ = ["DEFAULT_RULE", "LoraError", "LoraFile", "LoraMerge", "LoraModule", "LoraSpec", "RULES", "TEXT_PREFIX",
           "UNET_PREFIX", "as_spec", "lcm_lora_spec", "merge_lora", "merge_lora_file", "merge_lora_files",
           "module_delta", "module_index", "module_scales", "parse_lora", "parse_lora_arg", "read_lora"]
