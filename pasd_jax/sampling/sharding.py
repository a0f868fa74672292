"""Data-parallel placement for sampling: a 1-D mesh over all devices, images (or tiles) on the `data` axis.

Sampling has no cross-image (or, once cut, cross-tile) interaction, so data parallelism is the whole story: params
are replicated, batch-leading arrays (images, or tile chunks) are split along `data`, and the compiled programs
run unchanged on 1 CPU, 8 fake CPU devices or a GPU node. Batches are padded to a multiple of the device count
with copies of their last element (dropped from the results), so each device gets an equal share and no image's
result depends on its neighbours.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data",) mesh over `devices` (default: all devices)."""
    devs = list(devices) if devices is not None else jax.devices()
    if not devs:
        raise ValueError("no devices to sample on")
    return Mesh(np.asarray(devs), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `data` (the array's other axes replicated)."""
    return NamedSharding(mesh, P(DATA))


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


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a program: keep a batch-leading array split over `data` (a no-op on one device)."""
    if mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))
