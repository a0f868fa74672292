"""Weights in and out: PyTorch-layout folders and files <-> Flax (module, params).

- `from_pytorch(folder) -> (module, params)`, `to_pytorch(module, params, folder)`: one model folder.
- `load_checkpoint(path)`: a PASD checkpoint (official folder, converted once and cached, or an imported one).
- `load_sd_base(path)`: an SD1.x base from a diffusers folder or a single file.
- `personalize(source, unet=..., ...)`: swap in a personalized base or merge a LoRA, keeping PACA.
- `export_release(...)`, `import_official(...)`; CLI: `pasd-convert` (`pasd_jax/convert_cli.py`, above `runs`:
  its `export` reads train.py runs through `pasd_jax.runs.export_train_checkpoint`).
"""
from pasd_jax.convert.base import load_sd_base
from pasd_jax.convert.folders import (abstract_params, build_module, from_pytorch, init_params,
                                      load_pasd_checkpoint, to_pytorch)
from pasd_jax.convert.io import WeightFileError
from pasd_jax.convert.personalize import apply_lora, personalize, swap_base
from pasd_jax.convert.release import export_release, import_official, load_checkpoint
from pasd_jax.convert.tree import CheckpointMismatchError

__all__ = ["from_pytorch", "to_pytorch", "load_pasd_checkpoint", "load_checkpoint", "load_sd_base", "personalize",
           "swap_base", "apply_lora", "export_release", "import_official",
           "build_module", "abstract_params", "init_params", "WeightFileError", "CheckpointMismatchError"]
