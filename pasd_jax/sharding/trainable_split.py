"""Which parameters PASD trains: the whole ControlNet plus the UNet parameters whose path names a trainable module.

The official script passes `--trainable_modules pixel_attentions norm2_plus attn2_plus proj_in_plus` and matches
them as substrings of the PyTorch parameter names (spec 3.5); the Flax paths (`up_blocks_1/pixel_attentions_0/...`)
contain the same substrings, so the same rule applies unchanged to either variant.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flax import traverse_util


Params = Mapping[str, Any]
SEP = "/"
# The official --trainable_modules (train_pasd.py)
DEFAULT_TRAINABLE = ("pixel_attentions", "norm2_plus", "attn2_plus", "proj_in_plus")


def path_str(path: tuple) -> str:
    """A jax key path (dict keys, sequence indices, namedtuple fields) as "a/b/0/c"."""
    return SEP.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten(tree: Params) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep=SEP) if tree else {}


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep=SEP) if flat else {}


def is_trainable_unet_path(path: str, trainable: Iterable[str] = DEFAULT_TRAINABLE) -> bool:
    return any(name in path for name in trainable)


def split(tree: Params, predicate: Callable[[str], bool]) -> tuple[dict, dict]:
    """(leaves where predicate(path) holds, the others), both as nested dicts with the original paths."""
    flat = flatten(tree)
    yes = {k: v for k, v in flat.items() if predicate(k)}
    no = {k: v for k, v in flat.items() if not predicate(k)}
    return unflatten(yes), unflatten(no)


def merge(*trees: Params) -> dict:
    """The union of disjoint nested dicts; overlapping paths are a bug, so they raise."""
    out: dict[str, Any] = {}
    for tree in trees:
        flat = flatten(tree)
        clash = sorted(set(flat) & set(out))
        if clash:
            raise ValueError(f"parameter trees overlap at {clash[:3]}")
        out.update(flat)
    return unflatten(out)


def split_unet(unet_params: Params, trainable: Iterable[str] = DEFAULT_TRAINABLE) -> tuple[dict, dict]:
    """(trainable PACA / pasd_light params, frozen SD params) of a PASD UNet; raises if nothing is trainable."""
    trainable = tuple(trainable)
    train, frozen = split(unet_params, lambda p: is_trainable_unet_path(p, trainable))
    if not train:
        raise ValueError(f"no UNet parameter matches the trainable module names {trainable}: "
                         "is this a PASD UNet (variant pasd or pasd_light) and are the names right?")
    return train, frozen


def count(tree: Params) -> int:
    return int(sum(getattr(v, "size", 0) for v in flatten(tree).values()))
