"""Fusing LoRAs into Flax UNet / text-encoder params: only the targeted tensors are converted, and the fused
tensors are cached like converted checkpoints.

Each targeted weight goes to the PyTorch layout (transposes are exact), gets `W += multiplier * scale * delta` in
float32 for every LoRA in order, and comes back in its own dtype; all other leaves are returned as the same
objects. A cache entry holds just the fused leaves. Its key is the base's identity (`base_id` from the caller, e.g.
the checkpoint's conversion-cache key, or else a SHA-256 of the targeted base tensors), the shapes and dtypes of
the targets, and per LoRA its content hash, multiplier and rule, so a second load with the same inputs fuses
nothing, and any change (another base, an edited LoRA, a new multiplier) fuses again.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from pasd_jax.convert.cache import ConversionCache, config_digest, content_digest
from pasd_jax.convert.folders import style_of
from pasd_jax.convert.lora import LoraSpec, as_spec
from pasd_jax.convert.lora_formats import TEXT_ENCODER, UNET, LoraFile, read_lora
from pasd_jax.convert.lora_fuse import apply_plan, plan_merge
from pasd_jax.convert.naming import to_flax_layout, to_torch_layout, torch_key, torch_shape

# Bump whenever fusing could produce different tensors for the same inputs.
LORA_FUSE_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class LoraFusion:
    """New param trees (None where the component was not given), what changed and what was skipped."""
    unet: Any | None
    text_encoder: Any | None
    replaced: Mapping[str, tuple[str, ...]]   # component -> PyTorch keys of the fused weights
    skipped: tuple[str, ...]                  # LoRA modules of a component that was not given
    from_cache: bool = False


def _targets(params: Any, comp: str) -> tuple[dict, dict[str, tuple[str, ...]], dict[str, tuple[int, ...]]]:
    flat = flatten_dict(params)
    names = {torch_key(p, style_of(comp)): p for p in flat}
    shapes = {k: torch_shape(p, tuple(np.shape(flat[p]))) for k, p in names.items()}
    return flat, names, shapes


def _leaf_digest(flats: Mapping[str, dict], names: Mapping[str, dict], keys: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for comp, key in keys:
        a = np.ascontiguousarray(np.asarray(flats[comp][names[comp][key]]))
        h.update(f"{comp}.{key}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def fuse_lora_files(loras: Sequence[tuple[LoraFile, float, str]], *, unet: Any | None = None,
                    text_encoder: Any | None = None, cache: ConversionCache | None = None,
                    base_id: Any = None) -> LoraFusion:
    """Fuse parsed LoRAs `(file, multiplier, rule)` in order into UNet / text-encoder param trees.

    Every module of every LoRA is resolved and shape-checked first (all-or-nothing). With `cache`, the LoRA files
    must have been read from disk (`read_lora`), since their content hashes are part of the key.
    """
    given = {c: p for c, p in ((UNET, unet), (TEXT_ENCODER, text_encoder)) if p is not None}
    flats, names, shapes = {}, {}, {UNET: None, TEXT_ENCODER: None}
    for comp, params in given.items():
        flats[comp], names[comp], shapes[comp] = _targets(params, comp)
    plans, skipped = [], []
    for lora, multiplier, rule in loras:
        plan, skip = plan_merge(lora, shapes, multiplier=multiplier, rule=rule)
        plans += plan
        skipped += skip
    keys = list(dict.fromkeys((s.component, s.key) for s in plans))

    def compute() -> tuple[dict, dict]:
        work: dict[str, dict[str, np.ndarray]] = {c: {} for c in given}
        for comp, key in keys:
            path = names[comp][key]
            work[comp][key] = to_torch_layout(path, np.asarray(flats[comp][path], dtype=np.float32))
        apply_plan(plans, work)
        tree: dict[str, dict] = {}
        for comp, key in keys:
            path, old = names[comp][key], flats[comp][names[comp][key]]
            fused = to_flax_layout(path, work[comp][key], np.ndim(old)).astype(np.asarray(old).dtype)
            tree.setdefault(comp, {})[path] = np.ascontiguousarray(fused)
        return {c: unflatten_dict(t) for c, t in tree.items()}, {"lora_fuse": LORA_FUSE_VERSION}

    from_cache = False
    if cache is not None and keys:
        if any(not lora.sources for lora, _, _ in loras):
            raise ValueError("cached LoRA fusing needs LoRAs read from files (read_lora), not bare state dicts")
        ident = [{"files": [content_digest(s) for s in lora.sources], "multiplier": float(m), "rule": r}
                 for lora, m, r in loras]
        targets = [(c, k, list(shapes[c][k]), np.asarray(flats[c][names[c][k]]).dtype.str) for c, k in keys]
        base = base_id if base_id is not None else {"tensors": _leaf_digest(flats, names, keys)}
        key = {"op": "lora_fuse", "version": LORA_FUSE_VERSION, "base": base, "targets": config_digest(targets),
               "loras": ident}
        family = {"op": "lora_fuse", "base": base_id, "loras": [list(lora.sources) for lora, _, _ in loras]}
        conversions = cache.stats.conversions
        tree, _ = cache.load_or_compute(family, key, compute)
        from_cache = cache.stats.conversions == conversions
    else:
        tree, _ = compute()
    out: dict[str, Any] = {}
    replaced: dict[str, tuple[str, ...]] = {}
    for comp, params in given.items():
        fused = flatten_dict(tree.get(comp, {}))
        if not fused:
            out[comp] = params
            continue
        result = dict(flats[comp])
        for path, value in fused.items():
            result[path] = jnp.asarray(value, dtype=np.asarray(flats[comp][path]).dtype)
        out[comp] = unflatten_dict(result)
        replaced[comp] = tuple(sorted(k for c, k in keys if c == comp))
    return LoraFusion(out.get(UNET), out.get(TEXT_ENCODER), replaced, tuple(skipped), from_cache)


def fuse_loras(loras: Sequence["LoraSpec | tuple | Any"], *, unet: Any | None = None, text_encoder: Any | None = None,
               cache: ConversionCache | None = None, base_id: Any = None) -> LoraFusion:
    """Read and fuse LoRA files / folders given as `LoraSpec`s or `(path, multiplier[, rule])` (param trees in,
    param trees out; see `pasd_jax.convert.personalize.apply_loras` for the (module, params) form)."""
    specs = [as_spec(s) for s in loras]
    files = [(read_lora(s.path), s.multiplier, s.rule) for s in specs]
    return fuse_lora_files(files, unet=unet, text_encoder=text_encoder, cache=cache, base_id=base_id)
