"""The device mesh: named axes (data, fsdp, tensor), sized from a config with one axis allowed to take the rest.

The same code runs on one CPU, 8 fake CPU devices, a GPU node or a TPU pod slice: XLA's SPMD partitioner inserts
the collectives, so the math does not depend on the mesh. Sampling puts every device on `data`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from pasd_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DATA = "data"


class MeshError(ConfigError):
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


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); `mesh_cfg` None puts every device on data."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise MeshError("no devices to build a mesh on")
    sizes = mesh_shape({DATA: -1} if mesh_cfg is None else mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:  # topology-aware order on GPU/TPU (keeps the fastest links inside the inner axes)
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)
