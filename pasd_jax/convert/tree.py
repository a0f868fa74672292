"""Strict conversion between PyTorch state dicts and Flax parameter trees.

A partial load is the worst failure a converter can have (a model that runs and is silently wrong), so every
missing, unexpected or mis-shaped key is collected and reported together.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from pasd_jax.errors import WeightFileError

from pasd_jax.convert.io import aligned_copy
from pasd_jax.convert.naming import DIFFUSERS, to_flax_layout, to_torch_layout, torch_key, torch_shape

# Pre-0.14 diffusers VAE checkpoints (e.g. the original SD1.5 release) name the attention projections differently.
_LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


class CheckpointMismatchError(WeightFileError):
    """The weights do not fit the model built from the config: lists every offending key."""


def _listing(title: str, items: list[str], limit: int = 25) -> str:
    head = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {head}{more}"


def _legacy_alias(key: str) -> str | None:
    for new, old in _LEGACY.items():
        if new in key:
            return key.replace(new, old)
    return None


def torch_to_flax(state: Mapping[str, np.ndarray], abstract: Any, *, style: str = DIFFUSERS, what: str = "model",
                  ignore: Callable[[str], bool] = lambda k: False, dtype: Any = None) -> dict:
    """Map a PyTorch-named state dict onto the Flax tree `abstract` (arrays or ShapeDtypeStructs)."""
    flat = flatten_dict(abstract)
    out, missing, mis_shaped, used = {}, [], [], set()
    for path, leaf in flat.items():
        key = torch_key(path, style)
        src_key = key if key in state else _legacy_alias(key)
        if src_key is None or src_key not in state:
            missing.append(key)
            continue
        used.add(src_key)
        arr = np.asarray(state[src_key])
        try:
            conv = to_flax_layout(path, arr, len(leaf.shape))
        except ValueError as e:
            mis_shaped.append(f"{src_key}: {e}")
            continue
        if tuple(conv.shape) != tuple(leaf.shape):
            mis_shaped.append(f"{src_key}: checkpoint {tuple(arr.shape)}, model expects "
                              f"{torch_shape(path, tuple(leaf.shape))}")
            continue
        out[path] = aligned_copy(conv, dtype or leaf.dtype)  # C order, aliasable by the CPU device
    unexpected = sorted(k for k in state if k not in used and not ignore(k))
    if missing or unexpected or mis_shaped:
        parts = [f"{what}: the checkpoint does not match the model config"]
        if missing:
            parts.append(_listing("missing keys", sorted(missing)))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mis_shaped:
            parts.append(_listing("shape mismatches", sorted(mis_shaped)))
        parts.append("  Check that config.json belongs to these weights (and the variant: pasd, pasd_light, rrdb).")
        raise CheckpointMismatchError("\n".join(parts))
    return unflatten_dict(out)


def flax_to_torch(params: Any, *, style: str = DIFFUSERS, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Flax tree -> PyTorch-named numpy arrays in PyTorch layout (contiguous)."""
    out = {}
    for path, leaf in flatten_dict(params).items():
        arr = np.asarray(leaf)
        if dtype is not None:
            arr = arr.astype(dtype)
        out[torch_key(path, style)] = np.ascontiguousarray(to_torch_layout(path, arr))
    return out


def expected_torch_shapes(abstract: Any, style: str = DIFFUSERS) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> shape for an abstract Flax tree (manifest checks without weights)."""
    return {torch_key(p, style): torch_shape(p, tuple(l.shape)) for p, l in flatten_dict(abstract).items()}
