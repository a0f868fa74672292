"""Run pasd-jax's own modules in float64, for measuring how far a float32 golden is from exact.

`module.clone(dtype=float64)` alone is not a float64 evaluation: the models keep norm statistics, attention
logits, softmax and the final convs in float32 on purpose (`jnp.float32` written in the code), and the sampler
keeps its guidance arithmetic and the VAE's tiled norms in float32 (`F32`). `widen()` redirects exactly those
names to float64 for the rest of the process. Left as the official code has them: the sinusoidal timestep
embedding (diffusers computes it in float32 whatever the model dtype, so the official float64 runs described in
the golden READMEs keep it too), the scheduler tables and ANS multipliers (float32 numbers computed on the host, as
diffusers does; they are applied in float64), and the uint8 -> [0, 1] input table (exact in float64 too).

Never imported by the package or the tests: the patch is global and only this tool wants it.
"""
from __future__ import annotations

import importlib
import types

import jax
import jax.numpy as jnp

# Modules that write `jnp.float32` for their deliberate float32 islands (see the module docstrings).
MODEL_MODULES = ("layers", "attention", "clip_text", "unet", "vae", "controlnet", "resnet")


class _WideNumpy(types.ModuleType):
    """`jax.numpy` with `float32` meaning float64; every other name is jax.numpy's own."""

    float32 = jnp.float64

    def __getattr__(self, name: str):
        return getattr(jnp, name)


def widen() -> None:
    """Enable x64 and make the float32 islands of the models and the sampler float64 (for this process)."""
    jax.config.update("jax_enable_x64", True)
    wide = _WideNumpy("jax.numpy (float64 islands)")
    for name in MODEL_MODULES:
        mod = importlib.import_module(f"pasd_jax.models.{name}")
        if getattr(mod, "jnp", None) is not jnp:
            raise RuntimeError(f"pasd_jax.models.{name} no longer imports jax.numpy as jnp: update widen()")
        mod.jnp = wide
    for name in ("denoise", "vae_tiling"):
        mod = importlib.import_module(f"pasd_jax.sampling.{name}")
        if getattr(mod, "F32", None) is not jnp.float32:
            raise RuntimeError(f"pasd_jax.sampling.{name}.F32 is not jnp.float32 any more: update widen()")
        mod.F32 = jnp.float64
    from pasd_jax.sampling import options
    options.DTYPES["float64"] = jnp.float64     # the same dict object the pipeline reads


def to_f64(tree):
    """Every floating leaf of a params tree as float64."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)
