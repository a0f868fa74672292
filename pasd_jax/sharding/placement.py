"""Host <-> global arrays, across processes, and padding batches to the device count.

Sampling pads a batch to a multiple of the device count with copies of its last element (dropped from the
results), so each device gets an equal share and no image's result depends on its neighbours.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays that every process holds in full -> global arrays (works across hosts, unlike device_put of
    process-local data)."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree_util.tree_map(one, tree, shardings)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays (each process passes its own shard)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Global arrays -> full numpy arrays on every process (an all-gather across hosts when needed)."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def pad_leading(x: Any, size: int) -> Any:
    """Pad the leading axis to `size` with copies of the last element (numpy or jax arrays)."""
    n = x.shape[0]
    if n == size:
        return x
    if n > size or n == 0:
        raise ValueError(f"cannot pad a batch of {n} to {size}")
    xp = np if isinstance(x, np.ndarray) else jax.numpy
    return xp.concatenate([x, xp.repeat(x[-1:], size - n, axis=0)], axis=0)
