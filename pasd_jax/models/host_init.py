"""Random parameters drawn on the host with numpy, without compiling the model's init.

`module.init` under `jit` is one XLA program with a random draw per tensor, and XLA's CPU compile spends tens of
milliseconds on each: about 40 s for the tiny test models, far more at SD1.5 size. Here the module is only traced
abstractly (`jax.eval_shape`) while `layers.param` records each parameter's distribution by path, and the values
are then drawn with numpy. Each tensor has its own generator seeded by (seed, path), so values do not depend on
creation order. The distributions are the modules' own (PyTorch defaults, zero convs, RRDB scaling); the values
differ from `module.init`'s, which only matters to code that compares the two draws.
"""
from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from pasd_jax.models import layers


def host_params(module: Any, seed: int, *, stream: str = "", inputs: tuple | None = None) -> dict:
    """Params of `module` as numpy arrays in its param dtype. `stream` names the model, so that two models drawn
    with one seed (a UNet and a VAE both have `conv_in/kernel`) get independent values; `inputs` default to the
    module's `dummy_inputs()`."""
    args = module.dummy_inputs() if inputs is None else inputs
    with layers.recording_inits() as record:
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args)["params"])
    flat = traverse_util.flatten_dict(shapes)
    missing = ["/".join(p) for p in flat if p not in record]
    if missing:
        raise ValueError(f"{type(module).__name__}: {len(missing)} parameters were not created through "
                         f"pasd_jax.models.layers.param, so their distribution is unknown: {missing[:5]}")
    out = {}
    for path, shape in flat.items():
        rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(stream.encode()),
                                     zlib.crc32("/".join(path).encode())])
        out[path] = record[path].host(rng, shape.shape).astype(shape.dtype)
    return traverse_util.unflatten_dict(out)
