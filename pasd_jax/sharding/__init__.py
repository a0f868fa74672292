"""Where arrays live: device meshes, partition specs, host <-> global placement, and the trainable/frozen split.

One module for training and sampling alike. Training uses the (data, fsdp, tensor) mesh from its config and
partitions parameters by path rules; sampling uses the same mesh with every device on `data` (images or tiles are
split, params replicated). `trainable_split` says which parameters PASD trains.
"""
from pasd_jax.sharding import trainable_split
from pasd_jax.sharding.mesh import AXES, BATCH_AXES, DATA, MeshError, make_mesh, mesh_shape
from pasd_jax.sharding.placement import global_batch, pad_leading, put, round_up, to_host
from pasd_jax.sharding.specs import (Rules, batch_sharded, batch_sharding, constrain_batch, replicated, spec_for,
                                     tree_shardings)

__all__ = ["AXES", "BATCH_AXES", "DATA", "MeshError", "Rules", "batch_sharded", "batch_sharding", "constrain_batch",
           "global_batch", "make_mesh", "mesh_shape", "pad_leading", "put", "replicated", "round_up", "spec_for",
           "to_host", "trainable_split", "tree_shardings"]
