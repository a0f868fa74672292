"""The Flax modules of a PASD run and their parameters: building them from config dicts, random init, the frozen
base read from PyTorch folders. Shared by run setup, the train step and checkpoint export.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.convert import abstract_params, build_module, from_pytorch
from pasd_jax.convert.folders import CONTROLNET, TEXT_ENCODER, UNET, VAE
from pasd_jax.models.bundle import Models
from pasd_jax.models.host_init import host_params
from pasd_jax.sharding import trainable_split

BASE_KINDS = (UNET, VAE, TEXT_ENCODER)
Tree = Any


def build_models(configs: Mapping[str, dict], variant: str, compute_dtype: Any = jnp.float32,
                 remat: bool = False) -> Models:
    """Modules computing in `compute_dtype`; params are created fp32 and each tree keeps its own storage dtype."""
    kw = dict(dtype=compute_dtype, param_dtype=jnp.float32)
    return Models(unet=build_module(UNET, configs[UNET], variant=variant, remat=remat, **kw),
                  controlnet=build_module(CONTROLNET, configs[CONTROLNET], remat=remat, **kw),
                  vae=build_module(VAE, configs[VAE], **kw),
                  text_encoder=build_module(TEXT_ENCODER, configs[TEXT_ENCODER], **kw))


def to_numpy(tree: Tree) -> Tree:
    return jax.tree_util.tree_map(np.asarray, tree)


def cast(tree: Tree, dtype: Any) -> Tree:
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), tree)


def _check_same_keys(got: Tree, want: Tree, what: str) -> None:
    got_k, want_k = set(trainable_split.flatten(got)), set(trainable_split.flatten(want))
    if got_k != want_k:
        missing, extra = sorted(want_k - got_k)[:5], sorted(got_k - want_k)[:5]
        raise ValueError(f"{what}: parameter names do not match the model (missing {missing}, unexpected {extra})")


def load_frozen(models: Models, base: Mapping[str, str], trainable: tuple[str, ...],
                unet: Tree | None = None, kinds: tuple[str, ...] = BASE_KINDS) -> dict:
    """The frozen fp32 base (numpy) from PyTorch folders; the UNet folder may hold a plain SD or a PASD UNet (its
    trainable part is dropped). `unet`: full UNet params already in memory, used instead of reading base["unet"]."""
    out = {}
    for kind in kinds:
        params = to_numpy(from_pytorch(base[kind])[1] if unet is None or kind != UNET else unet)
        if kind == UNET:
            params = trainable_split.split(params, lambda p: trainable_split.is_trainable_unet_path(p, trainable))[1]
            want = trainable_split.split_unet(abstract(models.unet), trainable)[1]
        else:
            want = abstract(getattr(models, kind))
        _check_same_keys(params, want, f"frozen {kind} from {base[kind]}")
        out[kind] = params
    return out


def random_params(module, seed: int, stream: str) -> Tree:
    """Fresh params as host numpy arrays, drawn on the host from the modules' own distributions
    (`pasd_jax.models.host_init`): a jitted init compiles for tens of seconds even for the tiny models."""
    return host_params(module, seed, stream=stream)


@functools.lru_cache(maxsize=32)
def abstract(module) -> Tree:
    """Parameter shapes of a module (cached: tracing an SD-size init takes seconds)."""
    return abstract_params(module)
