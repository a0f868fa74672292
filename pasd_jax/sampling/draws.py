"""Every random draw of a sampling call, from one PRNG key per image, or injected (the recorded golden draws).

Each image's draws come from its own key, `jax.random.split(key, 4)` -> (posterior noise, noise at timesteps[0],
added noise at the ANS level, per-step scheduler noise), or (noise, offset noise) for the pure-noise start, so a
result does not depend on the batch it was sampled in.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DRAW_NAMES_ANS = ("posterior", "noise", "added_noise")
DRAW_NAMES_INIT_NOISE = ("noise", "offset_noise")
LatentShape = tuple[int, int, int]


def draw_one(key: jax.Array, latent_shape: LatentShape, init_noise: bool, variance_steps: int) -> dict:
    """One image's draws (traced; `jax.vmap` it over a batch of keys)."""
    k_a, k_b, k_c, k_d = jax.random.split(key, 4)
    if init_noise:
        return {"noise": jax.random.normal(k_a, latent_shape, jnp.float32),
                "offset_noise": jax.random.normal(k_b, latent_shape[:1] + (1, 1), jnp.float32)}
    d = {"posterior": jax.random.normal(k_a, latent_shape, jnp.float32),
         "noise": jax.random.normal(k_b, latent_shape, jnp.float32),
         "added_noise": jax.random.normal(k_c, latent_shape, jnp.float32)}
    if variance_steps:
        d["variance"] = jax.random.normal(k_d, (variance_steps,) + latent_shape, jnp.float32)
    return d


def check_draws(draws: Mapping[str, Any], b: int, latent_shape: LatentShape, init_noise: bool,
                variance_steps: int) -> dict[str, np.ndarray]:
    """Injected draws as float32 numpy, after checking that exactly the needed ones are there, shaped right."""
    names = DRAW_NAMES_INIT_NOISE if init_noise else DRAW_NAMES_ANS
    shapes = {n: (b,) + latent_shape for n in names}
    if init_noise:
        shapes["offset_noise"] = (b, latent_shape[0], 1, 1)
    if variance_steps:
        shapes["variance"] = (b, variance_steps) + latent_shape
    missing = [n for n in shapes if n not in draws]
    extra = [n for n in draws if n not in shapes]
    if missing or extra:
        raise ValueError(f"draws must hold exactly {sorted(shapes)}; missing {missing}, unexpected {extra}")
    out = {}
    for n, shape in shapes.items():
        a = np.asarray(draws[n], np.float32)
        if a.shape != shape:
            raise ValueError(f"draws[{n!r}] must have shape {shape}, got {a.shape}")
        out[n] = a
    return out
