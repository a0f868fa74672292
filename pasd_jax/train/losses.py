"""PASD's training objective (spec 5 and 1.4): the DDPM MSE plus the degradation-removal L1 pyramid, and for
colorization the colorfulness term on the pyramid outputs.

loss = mean((pred - target)^2) + gamma * sum_k mean(|rgb_k - down_k(GT)|) [+ colour term], GT in [-1, 1] at the
conditioning resolution and down_k torch's non-antialiased bilinear resize to rgb_k's size (1/2, 1/4, 1/8). The
target is epsilon or v, as the scheduler config's prediction_type says (train_pasd.py). Everything is reduced in
fp32 whatever the compute dtype.

Colorfulness (official `colorful_loss`, grayscale training only): per image and DR output, with rg = |R - G| and
yb = |(R + G) / 2 - B|, c = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2) (unbiased std), and
the term is 0.001 * sum over outputs and images of (1 - c). Two official details (spec 5, appendix A12):
- it is added inside the loop over the three outputs, each time summed over all three, so it counts **3 times**
  (`repeats=3`, "official"); `repeats=1` is the single term the code means;
- it is summed over the per-GPU batch (4 in train_pasd.sh) while DDP averages gradients over GPUs, so its weight
  relative to the mean-reduced terms is 4 x the batch mean. Here it is `batch` x the batch mean, `batch` = 4 by
  default, so the weight does not depend on how the global batch is split over devices.
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


def _sqrt(x: jax.Array) -> jax.Array:
    """sqrt with a zero (not infinite) gradient at 0: a flat output must not turn the step into NaNs."""
    safe = jnp.where(x > 0, x, 1.0)
    return jnp.where(x > 0, jnp.sqrt(safe), 0.0)


def colorfulness(rgb: jax.Array) -> jax.Array:
    """Hasler-Suesstrunk colorfulness per image of an NCHW RGB batch, as the official `colorful_loss` computes it
    (torch.std: unbiased). Returns [N] float32."""
    x = rgb.astype(jnp.float32)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg = jnp.abs(r - g).reshape(x.shape[0], -1)
    yb = jnp.abs(0.5 * (r + g) - b).reshape(x.shape[0], -1)
    std = _sqrt(jnp.var(rg, axis=1, ddof=1) + jnp.var(yb, axis=1, ddof=1))
    mean = _sqrt(jnp.square(jnp.mean(rg, axis=1)) + jnp.square(jnp.mean(yb, axis=1)))
    return std + 0.3 * mean


def colorfulness_loss(rgbs: Sequence[jax.Array], weight: float = 0.001, repeats: int = 3,
                      batch: int = 4) -> jax.Array:
    """weight * repeats * batch * sum over DR outputs of mean over images of (1 - colorfulness); see the module
    docstring for `repeats` (3 = the official loop, 1 = the intended single term) and `batch`."""
    per_output = [jnp.mean(1.0 - colorfulness(rgb)) for rgb in rgbs]
    return jnp.float32(weight * repeats * batch) * sum(per_output)


def pasd_loss(noise_pred: jax.Array, noise: jax.Array, rgbs: Sequence[jax.Array], gt: jax.Array,
              dr_weight: float = 1.0, colorfulness_weight: float = 0.0, colorfulness_repeats: int = 3,
              colorfulness_batch: int = 4) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, {"mse", "dr_l1_<k>"[, "colorfulness"]}): the terms are logged separately so a run shows which
    one moves. `colorfulness_weight` > 0 adds the colorization term (0.001 officially)."""
    mse = noise_mse(noise_pred, noise)
    l1s = dr_l1(rgbs, gt)
    total = mse + dr_weight * sum(l1s) if l1s else mse
    terms = {"mse": mse, **{f"dr_l1_{k}": v for k, v in enumerate(l1s)}}
    if colorfulness_weight and rgbs:
        colour = colorfulness_loss(rgbs, colorfulness_weight, colorfulness_repeats, colorfulness_batch)
        total = total + colour
        terms["colorfulness"] = colour
    return total, terms
