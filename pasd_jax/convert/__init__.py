"""Weights in and out: PyTorch-layout folders and files <-> Flax (module, params).

Public entry points: `from_pytorch(folder) -> (module, params)`, `to_pytorch(module, params, folder)`,
`load_pasd_checkpoint(folder)`.
"""
from pasd_jax.convert.folders import (abstract_params, build_module, from_pytorch, init_params,
                                      load_pasd_checkpoint, to_pytorch)
from pasd_jax.convert.io import WeightFileError
from pasd_jax.convert.tree import CheckpointMismatchError

__all__ = ["from_pytorch", "to_pytorch", "load_pasd_checkpoint", "build_module", "abstract_params", "init_params",
           "WeightFileError", "CheckpointMismatchError"]
