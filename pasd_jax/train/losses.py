"""PASD's training objective (spec 5 and 1.4): the DDPM epsilon MSE plus the degradation-removal L1 pyramid.

loss = mean((eps_hat - eps)^2) + gamma * sum_k mean(|rgb_k - down_k(GT)|), GT in [-1, 1] at the conditioning
resolution and down_k torch's non-antialiased bilinear resize to rgb_k's size (1/2, 1/4, 1/8). Everything is reduced
in fp32 whatever the compute dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pasd_jax.image_ops import resize_bilinear_no_antialias


def noise_mse(noise_pred: jax.Array, noise: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(noise_pred.astype(jnp.float32) - noise.astype(jnp.float32)))


def dr_l1(rgbs: Sequence[jax.Array], gt: jax.Array) -> tuple[jax.Array, ...]:
    """One L1 per DR output (NCHW) against the GT (NCHW, [-1, 1]) resized to that output's size, no antialiasing."""
    gt = gt.astype(jnp.float32)
    return tuple(jnp.mean(jnp.abs(rgb.astype(jnp.float32) - resize_bilinear_no_antialias(gt, rgb.shape[-2:])))
                 for rgb in rgbs)


def pasd_loss(noise_pred: jax.Array, noise: jax.Array, rgbs: Sequence[jax.Array], gt: jax.Array,
              dr_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, {"mse", "dr_l1_<k>"}): the terms are logged separately so a run shows which one moves."""
    mse = noise_mse(noise_pred, noise)
    l1s = dr_l1(rgbs, gt)
    total = mse + dr_weight * sum(l1s) if l1s else mse
    terms = {"mse": mse, **{f"dr_l1_{k}": v for k, v in enumerate(l1s)}}
    return total, terms
