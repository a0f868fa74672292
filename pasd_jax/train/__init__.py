"""PASD training: frozen SD base, trainable ControlNet + PACA, sharded over any device mesh.

Modules, one job each: `models` (the Flax modules and their params), `setup` (starting params), `partition`
(trainable/frozen split), `losses`, `step` (the pure train step), `sharding` (mesh and rules), `layout` (shardings +
AOT-compiled step), `data` (loader -> global batches), `checkpoint` (Orbax), `export` (a run back as full PASD
models, official layout), `metrics`, `validate` (config checks), `validation` (samples during training),
`loop` (`train`).
"""
from pasd_jax.train.export import export_pytorch, export_train_checkpoint, restore_for_export
from pasd_jax.train.loop import NonFiniteLossError, RunResult, train
from pasd_jax.train.validate import ConfigError

__all__ = ["ConfigError", "NonFiniteLossError", "RunResult", "export_pytorch", "export_train_checkpoint",
           "restore_for_export", "train"]
