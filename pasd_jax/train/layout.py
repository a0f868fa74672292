"""Where every array of a run lives on the mesh, and the train step compiled ahead of time for that placement.

`make_layout` turns the models, the optimizer and the sharding rules into abstract trees (shapes, dtypes) with
their NamedShardings; `compile_step` lowers the jitted step on those abstract values (no data needed) and caches
the executable, so restarting a run in the same process (tests, notebooks) does not trace or compile again.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from pasd_jax.convert.folders import CONTROLNET, TEXT_ENCODER, UNET, VAE
from pasd_jax import sharding
from pasd_jax.sharding import trainable_split
from pasd_jax.models.bundle import Models
from pasd_jax.runs.models import abstract
from pasd_jax.train.step import Diffusion, init_state, make_optimizer, make_train_step

RUN_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)  # raw threefry key data of the run


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Abstract trees of a run and their shardings on one mesh (hashed by identity: `make_layout` is cached)."""
    mesh: Mesh
    trainable: Any
    frozen: Any
    state: Any
    trainable_sh: Any
    frozen_sh: Any
    state_sh: Any
    batch_sh: NamedSharding

    @property
    def replicated(self) -> NamedSharding:
        return sharding.replicated(self.mesh)

    def abstract_state(self) -> Any:
        """State shapes carrying the target shardings (what a checkpoint restores into)."""
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      self.state, self.state_sh)

    def abstract_frozen(self) -> Any:
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      self.frozen, self.frozen_sh)


def freeze(mapping: Mapping[str, Any]) -> tuple:
    """A hashable (sorted item tuple) copy of a flat config section, for cache keys."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(mapping).items()))


@functools.lru_cache(maxsize=8)
def make_layout(models: Models, names: tuple[str, ...], compute_dtype: str, optim: tuple, mesh: Mesh,
                rules: tuple, min_size: int) -> Layout:
    """Trainable params fp32, frozen params in the compute dtype, optimizer moments like their params."""
    unet_train, unet_frozen = trainable_split.split_unet(abstract(models.unet), names)
    trainable = {CONTROLNET: abstract(models.controlnet), UNET: unet_train}
    frozen = {UNET: unet_frozen, VAE: abstract(models.vae), TEXT_ENCODER: abstract(models.text_encoder)}
    frozen = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(compute_dtype)), frozen)
    tx, _ = make_optimizer(dict(optim))
    state = jax.eval_shape(lambda p, k: init_state(p, tx, k), trainable, RUN_KEY)
    shard = functools.partial(sharding.tree_shardings, mesh=mesh, rules=rules, min_size=min_size)
    return Layout(mesh, trainable, frozen, state, shard(trainable), shard(frozen), shard(state),
                  sharding.batch_sharding(mesh))


def batch_shapes(layout: Layout, grad_accum: int, micro_batch: int, resolution: int,
                 max_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    img = jax.ShapeDtypeStruct((grad_accum, micro_batch, resolution, resolution, 3), jnp.uint8,
                               sharding=layout.batch_sh)
    ids = jax.ShapeDtypeStruct((grad_accum, micro_batch, max_length), jnp.int32, sharding=layout.batch_sh)
    return {"hq": img, "lq": img, "input_ids": ids}


@functools.lru_cache(maxsize=8)
def compile_step(models: Models, diffusion: Diffusion, layout: Layout, optim: tuple,
                 batch_dims: tuple[int, int, int], return_grads: bool = False):
    """The jitted, sharded, state-donating step compiled for batches of (grad_accum, micro_batch, resolution)."""
    tx, schedule = make_optimizer(dict(optim))
    out_metrics = layout.replicated
    if return_grads:
        out_metrics = None  # let XLA place the returned gradients
    fn = jax.jit(make_train_step(models, diffusion, tx, schedule, return_grads),
                 in_shardings=(layout.state_sh, layout.frozen_sh, layout.batch_sh),
                 out_shardings=(layout.state_sh, out_metrics), donate_argnums=(0,))
    batch = batch_shapes(layout, *batch_dims, models.text_encoder.config.max_position_embeddings)
    return fn.lower(layout.abstract_state(), layout.abstract_frozen(), batch).compile()


def create_state(layout: Layout, trainable: Any, optim: tuple, rng: jax.Array) -> dict:
    """A fresh train state from host params, every array placed as the layout says."""
    tx, _ = make_optimizer(dict(optim))
    create = jax.jit(lambda p, k: init_state(p, tx, k), in_shardings=(layout.trainable_sh, layout.replicated),
                     out_shardings=layout.state_sh)
    return create(sharding.put(trainable, layout.trainable_sh),
                  sharding.put(np.asarray(rng, np.uint32), layout.replicated))
