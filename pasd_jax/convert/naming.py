"""Flax parameter paths <-> PyTorch state-dict keys, and the tensor layout change between them.

The mapping is computed from the Flax side: every Flax leaf has exactly one PyTorch name, so missing and unexpected
keys fall out as set differences. Rules (diffusers' Flax convention): `down_blocks_0` <-> `down_blocks.0`,
`kernel`/`scale`/`embedding` <-> `weight`, conv HWIO <-> OIHW, dense [in, out] <-> [out, in]. The VAE attention's
`query/key/value/proj_attn` <-> `to_q/to_k/to_v/to_out.0`. transformers-style trees (`layers/0`) keep numbered
path segments as separate names.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

DIFFUSERS = "diffusers"
TRANSFORMERS = "transformers"

# Flax names whose trailing _<n> is part of the name, not a list index.
_NOT_INDEXED = {"linear_1", "linear_2"}
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _segment_to_torch(seg: str) -> str:
    if seg in _NOT_INDEXED:
        return seg
    m = _INDEXED.match(seg)
    return f"{m.group(1)}.{m.group(2)}" if m else seg


def torch_key(path: Sequence[str], style: str = DIFFUSERS) -> str:
    """The PyTorch state-dict key of one Flax parameter path."""
    *mods, leaf = path
    if leaf not in _LEAF:
        raise KeyError(f"no PyTorch name for Flax leaf {'/'.join(path)}")
    if style == TRANSFORMERS:
        return ".".join([*mods, _LEAF[leaf]])
    names = [_VAE_ATTENTION.get(m, _segment_to_torch(m)) if i == len(mods) - 1 else _segment_to_torch(m)
             for i, m in enumerate(mods)]
    return ".".join([*names, _LEAF[leaf]])


def to_flax_layout(path: Sequence[str], arr: np.ndarray, flax_ndim: int) -> np.ndarray:
    """PyTorch tensor -> Flax layout for the leaf at `path` (whose Flax rank is `flax_ndim`)."""
    leaf = path[-1]
    if leaf == "kernel":
        if arr.ndim == 4 and flax_ndim == 4:
            return np.transpose(arr, (2, 3, 1, 0))
        if arr.ndim == 4 and flax_ndim == 2:  # a 1x1 conv stored where a dense layer is expected
            if arr.shape[2:] != (1, 1):
                raise ValueError(f"{'/'.join(path)}: cannot use a {arr.shape[2]}x{arr.shape[3]} conv as a dense")
            return arr[:, :, 0, 0].T
        if arr.ndim == 2:
            return arr.T
    return arr


def to_torch_layout(path: Sequence[str], arr: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if arr.ndim == 4:
            return np.transpose(arr, (3, 2, 0, 1))
        if arr.ndim == 2:
            return arr.T
    return arr


def torch_shape(path: Sequence[str], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        if len(flax_shape) == 4:
            h, w, i, o = flax_shape
            return (o, i, h, w)
        if len(flax_shape) == 2:
            return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)
