"""Device mesh, parameter partitioning rules, and host<->global array placement.

The mesh has the named axes (data, fsdp, tensor). Parameters (trainable, frozen, and the optimizer moments that
mirror them) are partitioned by regex rules on their path: a rule names the mesh axis of each *trailing* dim, so
one rule covers Dense kernels (in, out) and HWIO conv kernels alike. The batch is split over data x fsdp. The same
code runs on one CPU, 8 fake CPU devices, a GPU node or a TPU pod slice: XLA's SPMD partitioner inserts the
collectives, so the math does not depend on the mesh.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pasd_jax.train.partition import path_str

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, Sequence[str | None]]]


class MeshError(ValueError):
    """The mesh in the config does not fit the devices."""


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes with one -1 filled in; raises MeshError with what to change when they do not fit."""
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in AXES}
    unknown = sorted(set(mesh_cfg) - set(AXES))
    if unknown:
        raise MeshError(f"mesh axes {unknown} are unknown; the mesh axes are {AXES}")
    fill = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad or len(fill) > 1:
        raise MeshError(f"mesh sizes {sizes}: each axis must be a positive size, and at most one may be -1 "
                        "(take the remaining devices)")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n_devices % fixed:
            raise MeshError(f"mesh {sizes}: the fixed axes use {fixed} devices, which does not divide the "
                            f"{n_devices} devices; change mesh.{'/'.join(a for a in AXES if a not in fill)}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(f"mesh {sizes} needs {fixed} devices but there are {n_devices}; set the sizes so their "
                        "product is the device count, or set one axis to -1 (e.g. --config.mesh.data=-1)")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:  # topology-aware order on GPU/TPU (keeps the fastest links inside the inner axes)
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


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
    """Batches are [grad_accum, batch, ...]: the micro-batch axis is split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


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
