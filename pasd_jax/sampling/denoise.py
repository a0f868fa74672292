"""Pure building blocks of the PASD sampler (spec 4.5-4.9): latent init with the ANS, the guided ControlNet + UNet
noise estimate, the denoising `lax.scan`, and decoding to uint8.

Every function here is traced inside a program built by `pipeline.PASDPipeline` (and `tiled`); nothing touches the host. Runtime
scalars (guidance, conditioning scale, ANS coefficients, offset-noise scale) are arrays, so changing them never
recompiles.

Classifier-free guidance runs as one batch per step. The batch is interleaved per image, [neg_0, pos_0, neg_1,
pos_1, ...] (for one image: the official [negative; positive]), so a batch split over devices keeps each image's
pair on one device; per-sample results do not depend on the batch order.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.models.shared_batch import to_batch
from pasd_jax.models.vae import sample_posterior
from pasd_jax.sampling import vae_tiling
from pasd_jax.schedulers.ans import add_noise

F32 = jnp.float32
# eps_fn(params, z [N, 4, h, w] f32, t int32 [], context [N, k, 77, D], cond [N, 3, 8h, 8w] f32 in [0, 1],
#        guidance f32 [], conditioning_scale f32 []) -> guided noise estimate [N, 4, h, w] f32
EpsFn = Callable[..., jax.Array]


class Scalars(NamedTuple):
    """Runtime (traced) scalars of one sampling call."""
    guidance: jax.Array        # CFG scale w
    cond_scale: jax.Array      # ControlNet conditioning scale
    ans: jax.Array             # [4]: signal/noise of the add_noise at timesteps[0], then at the ANS level
    offset_scale: jax.Array    # offset-noise scale of the pure-noise start


def make_guided_eps(unet: Any, controlnet: Any) -> EpsFn:
    """ControlNet then PASD UNet on the CFG batch, then eps_u + w (eps_c - eps_u) in fp32. The text-independent
    prefix of both models runs once per image (`models.shared_batch`).

    `context` is [N, 2, 77, D] ([negative, positive]) with guidance, or [N, 1, 77, D] without (the official
    pipeline skips CFG when the scale is <= 1 and runs the positive prompt alone).
    """
    def eps_fn(params, z, t, context, cond, guidance, cond_scale):
        n, k = z.shape[0], context.shape[1]
        ctx = context.reshape((n * k,) + context.shape[2:])
        # z and cond stay at the image batch: the models repeat them per prompt at their first text layer
        _, down, mid = controlnet.apply({"params": params["controlnet"]}, z, t, ctx, cond, cond_scale)
        eps = unet.apply({"params": params["unet"]}, z, t, ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).astype(F32)
        eps = to_batch(eps, n * k)
        if k == 1:
            return eps
        eps = eps.reshape((n, k) + eps.shape[1:])
        uncond, text = eps[:, 0], eps[:, 1]
        return uncond + guidance.astype(F32) * (text - uncond)
    return eps_fn


_U8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)   # correctly rounded x / 255


def condition_image(images_u8: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 NCHW in [0, 1] (the ControlNet input; x * 2 - 1 is the VAE input).

    Through a 256-entry table of correctly rounded x / 255: XLA's CPU division is not correctly rounded (1 ulp off
    for half the byte values), and the ControlNet + CFG amplify such input differences ~100x.
    """
    return jnp.asarray(_U8_TO_UNIT)[jnp.transpose(images_u8, (0, 3, 1, 2)).astype(jnp.int32)]


def initial_latents(vae: Any, vae_params: Any, cond: jax.Array, draws: dict, scalars: Scalars, *,
                    init_noise: bool, encoder_tile: int | None, init_noise_sigma: float = 1.0) -> jax.Array:
    """z_N (spec 4.5): 0.18215 * posterior sample of the encoded image, noised at timesteps[0] and again at the
    ANS level (draw order: posterior, noise, added_noise); or, with `init_noise`, noise + s * offset_noise."""
    if init_noise:
        z = draws["noise"].astype(F32) + scalars.offset_scale * draws["offset_noise"].astype(F32)
    else:
        mean, logvar = vae_tiling.encode(vae, vae_params, cond * 2.0 - 1.0, encoder_tile)
        z_lr = vae.config.scaling_factor * sample_posterior(mean, logvar, draws["posterior"].astype(F32))
        z = add_noise(z_lr, draws["noise"], scalars.ans[0], scalars.ans[1])
        z = add_noise(z, draws["added_noise"], scalars.ans[2], scalars.ans[3])
    return z * jnp.asarray(init_noise_sigma, F32)


def scheduler_step(sched: Any, carry: Any, i: jax.Array, eps: jax.Array, variance: jax.Array | None):
    if variance is not None:
        return sched.step(carry, i, eps, variance)
    return sched.step(carry, i, eps)


def denoise(eps_fn: EpsFn, params: Any, sched: Any, z: jax.Array, context: jax.Array, cond: jax.Array,
            scalars: Scalars, variance: jax.Array | None = None, return_intermediates: bool = False,
            constrain: Callable[[jax.Array], jax.Array] = lambda x: x,
            on_step: Callable[[jax.Array, jax.Array], None] | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The whole denoising loop as one `lax.scan` over step indices. Returns the final latent and, on request,
    the latent after every step [N, B, 4, h, w]. `variance` [N, B, 4, h, w] is the scheduler's per-step noise
    (DDIM with eta > 0). `on_step(i, z)` is traced into the loop body after each step (a host callback; z,
    the new latent, makes it wait for the step to finish)."""
    timesteps = jnp.asarray(np.asarray(sched.timesteps), jnp.int32)

    def body(carry, xs):
        i, var = xs
        eps = eps_fn(params, carry.sample, timesteps[i], context, cond, scalars.guidance, scalars.cond_scale)
        sample, carry = scheduler_step(sched, carry, i, eps, var)
        carry = carry._replace(sample=constrain(carry.sample))
        if on_step is not None:
            on_step(i, carry.sample)
        return carry, (sample if return_intermediates else None)

    steps = jnp.arange(sched.num_inference_steps)
    carry, inter = jax.lax.scan(body, sched.init_carry(z), (steps, variance))
    return carry.sample, inter


def decode_images(vae: Any, vae_params: Any, z: jax.Array, decoder_tile: int | None) -> tuple[jax.Array, jax.Array]:
    """Latents -> (uint8 NHWC round(clamp(x / 2 + 0.5) * 255), the decoder's float NCHW output)."""
    decoded = vae_tiling.decode(vae, vae_params, z / jnp.asarray(vae.config.scaling_factor, F32), decoder_tile)
    u8 = jnp.round(jnp.clip(decoded.astype(F32) / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)
    return jnp.transpose(u8, (0, 2, 3, 1)), decoded
