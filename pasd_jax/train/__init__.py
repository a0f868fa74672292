"""PASD training: frozen SD base, trainable ControlNet + PACA, sharded over any device mesh.

Modules, one job each: `setup` (starting params), `losses`, `step` (the pure train step), `layout` (where every
array lives + the AOT-compiled step), `data` (loader -> global batches), `metrics`, `config_checks` (config values
checked before anything compiles), `validation` (samples during training), `loop` (`train`) and `cli`
(`pasd-train`). Reading and writing a run's checkpoints lives in `pasd_jax.runs`, meshes and the trainable split
in `pasd_jax.sharding`.
"""
from pasd_jax.train.loop import NonFiniteLossError, RunResult, train

__all__ = ["NonFiniteLossError", "RunResult", "train"]
