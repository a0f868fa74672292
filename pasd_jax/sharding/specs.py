"""Partition specs: parameters by regex rules on their path, batches over data x fsdp.

A rule names the mesh axis of each *trailing* dim, so one rule covers Dense kernels (in, out) and HWIO conv
kernels alike; the optimizer moments mirror their params.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pasd_jax.sharding.mesh import BATCH_AXES, DATA
from pasd_jax.sharding.trainable_split import path_str

Rules = Sequence[tuple[str, Sequence[str | None]]]


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules, min_size: int = 0) -> P:
    """The PartitionSpec of one array: the first rule whose regex matches `path`, trailing dims aligned; an axis
    that does not divide its dim (or of size 1) is dropped, and arrays under `min_size` elements are replicated."""
    if len(shape) == 0 or math.prod(shape) < max(min_size, 1):
        return P()
    for pattern, axes in rules:
        if re.search(pattern, path):
            axes = tuple(axes)[-len(shape):]
            dims: list[str | None] = [None] * (len(shape) - len(axes))
            for size, axis in zip(shape[len(shape) - len(axes):], axes):
                keep = axis is not None and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
                dims.append(axis if keep else None)
            while dims and dims[-1] is None:
                dims.pop()
            return P(*dims)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules, min_size: int = 0) -> Any:
    """NamedShardings for every leaf of a (possibly abstract) tree, by path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_str(path), np.shape(x), mesh, rules, min_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Training batches are [grad_accum, batch, ...]: the micro-batch axis is split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sampling batches (images, or tile chunks): the leading axis split over `data`."""
    return NamedSharding(mesh, P(DATA))


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a program: keep a batch-leading array split over `data` (a no-op on one device)."""
    if mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))
