"""PASD training: frozen SD base, trainable ControlNet + PACA, sharded over any device mesh.

Modules, one job each: `setup` (models and starting params), `partition` (trainable/frozen split), `losses`,
`step` (the pure train step), `sharding` (mesh and rules), `layout` (shardings + AOT-compiled step), `data`
(loader -> global batches), `checkpoint` (Orbax; `restore_for_export`), `metrics`, `validate`, `loop` (`train`).
"""
from pasd_jax.train.checkpoint import export_pytorch, restore_for_export
from pasd_jax.train.loop import NonFiniteLossError, RunResult, train
from pasd_jax.train.validate import ConfigError

__all__ = ["ConfigError", "NonFiniteLossError", "RunResult", "export_pytorch", "restore_for_export", "train"]
