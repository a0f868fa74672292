"""One PASD optimizer step as a pure function: (state, frozen params, batch) -> (state, metrics).

Inside one jit: for each of the `grad_accum` micro-batches, VAE-encode the GT and draw the posterior sample, the
noise, the timestep and the null-caption mask from per-sample keys folded from (run key, step, sample position);
encode the text; run ControlNet + UNet; take gradients of the trainable params only. The averaged gradients go
through the optax chain (clip 1.0 -> AdamW). Randomness depends only on the step number, so a resumed run draws
exactly what an uninterrupted one draws. `draw_inputs` and `forward_losses` are separate so tests can inject the
model inputs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pasd_jax.convert.folders import CONTROLNET, TEXT_ENCODER, UNET, VAE
from pasd_jax.models.vae import sample_posterior
from pasd_jax.sharding import trainable_split
from pasd_jax.train.losses import pasd_loss
from pasd_jax.models.bundle import Models

State = dict[str, Any]  # {"step": int32[], "params": trainable tree, "opt_state": ..., "rng": uint32[2]}


class StepInputs(NamedTuple):
    """What the ControlNet and UNet see, and the targets (NCHW)."""
    noisy_latents: jax.Array
    timesteps: jax.Array
    encoder_hidden_states: jax.Array
    cond: jax.Array        # LQ image in [0, 1] at the GT resolution
    gt: jax.Array          # GT image in [-1, 1]
    target: jax.Array      # epsilon (or v) the UNet must predict


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """The DDPM training schedule and the conditioning rules, hashable for jit."""
    alphas_cumprod: tuple[float, ...]
    null_ids: tuple[int, ...]
    null_text_ratio: float = 0.5
    prediction_type: str = "epsilon"
    dr_weight: float = 1.0
    conditioning_scale: float = 1.0
    colorfulness_weight: float = 0.0   # colorization: 0.001 (train.losses), with its official repeat and batch
    colorfulness_repeats: int = 3
    colorfulness_batch: int = 4


def forward_losses(trainable: Mapping, frozen_unet: Mapping, models: Models, x: StepInputs,
                   diffusion: Diffusion) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ControlNet + PASD UNet forward and the PASD loss; differentiable in `trainable`."""
    rgbs, down, mid = models.controlnet.apply(
        {"params": trainable[CONTROLNET]}, x.noisy_latents, x.timesteps, x.encoder_hidden_states, x.cond,
        diffusion.conditioning_scale)
    unet_params = trainable_split.merge(frozen_unet, trainable[UNET])
    pred = models.unet.apply({"params": unet_params}, x.noisy_latents, x.timesteps, x.encoder_hidden_states,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return pasd_loss(pred, x.target, rgbs, x.gt, diffusion.dr_weight, diffusion.colorfulness_weight,
                     diffusion.colorfulness_repeats, diffusion.colorfulness_batch)


def draw_inputs(frozen: Mapping, models: Models, batch: Mapping[str, jax.Array], keys: jax.Array,
                diffusion: Diffusion) -> StepInputs:
    """Frozen half of the step: uint8 NHWC images + token ids -> noisy latents, text states and targets.

    `keys` holds one PRNG key per sample: what a sample draws (posterior noise, epsilon, t, null caption) does
    not depend on how the batch is split into micro-batches or over devices."""
    sample = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
    gt = jnp.transpose(batch["hq"], (0, 3, 1, 2)).astype(jnp.float32) * (2.0 / 255.0) - 1.0
    cond = jnp.transpose(batch["lq"], (0, 3, 1, 2)).astype(jnp.float32) / 255.0
    mean, logvar = models.vae.apply({"params": frozen[VAE]}, gt, method=models.vae.encode)
    normal = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))
    latents = sample_posterior(mean, logvar, normal(sample[:, 0])) * models.vae.config.scaling_factor
    noise = normal(sample[:, 1])
    abar = jnp.asarray(np.asarray(diffusion.alphas_cumprod, np.float32))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, abar.shape[0], jnp.int32))(sample[:, 2])
    sa = jnp.sqrt(abar[t])[:, None, None, None]
    so = jnp.sqrt(1.0 - abar[t])[:, None, None, None]
    noisy = sa * latents + so * noise
    target = noise if diffusion.prediction_type == "epsilon" else sa * noise - so * latents
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    null = jax.vmap(lambda k: jax.random.uniform(k, ()))(sample[:, 3]) < diffusion.null_text_ratio
    ids = jnp.where(null[:, None], jnp.asarray(diffusion.null_ids, jnp.int32)[None, :], ids)
    ehs = models.text_encoder.apply({"params": frozen[TEXT_ENCODER]}, ids)
    return StepInputs(noisy, t, ehs, cond, gt, target)


def make_optimizer(optim: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip by global norm, then AdamW (PyTorch's AdamW: decoupled decay lr*wd*p), Adam or SGD; constant lr after
    an optional linear warmup (the official "constant" schedule ignores warmup, so the default is 0)."""
    lr = float(optim["lr"])
    warmup = int(optim.get("warmup_steps", 0))
    schedule = (optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr))
    if warmup:
        schedule = optax.join_schedules([schedule, optax.constant_schedule(lr)], [warmup])
    name = optim["name"]
    if name == "adamw":
        tx = optax.adamw(schedule, optim["b1"], optim["b2"], optim["eps"], weight_decay=optim["weight_decay"])
    elif name == "adam":
        tx = optax.adam(schedule, optim["b1"], optim["b2"], optim["eps"])
    elif name == "sgd":
        tx = optax.sgd(schedule, momentum=optim.get("momentum") or None)
    else:
        raise ValueError(f"unknown optimizer {name!r}: expected adamw, adam or sgd")
    if optim.get("max_grad_norm"):
        tx = optax.chain(optax.clip_by_global_norm(float(optim["max_grad_norm"])), tx)
    return tx, schedule


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jnp.asarray(rng, jnp.uint32)}


def make_train_step(models: Models, diffusion: Diffusion, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, return_grads: bool = False
                    ) -> Callable[[State, Mapping, Mapping], tuple[State, dict]]:
    """The step to jit: batch leaves are [grad_accum, micro_batch, ...]; metrics are fp32 scalars (plus the
    averaged gradients under "grads" with `return_grads`, for tests that compare them across meshes)."""

    def loss_fn(trainable, frozen_unet, x):
        return forward_losses(trainable, frozen_unet, models, x, diffusion)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(params, frozen, batch, keys):
        x = draw_inputs(frozen, models, batch, keys, diffusion)
        (loss, terms), grads = grad_fn(params, frozen[UNET], x)
        return grads, {"loss": loss, **terms}

    def step(state: State, frozen: Mapping, batch: Mapping) -> tuple[State, dict]:
        params = state["params"]
        key = jax.random.fold_in(state["rng"], state["step"])
        accum, micro_batch = jax.tree_util.tree_leaves(batch)[0].shape[:2]
        # One key per sample of the step, by position: the same draws for any grad_accum split and any mesh.
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(accum * micro_batch))
        keys = keys.reshape(accum, micro_batch, *keys.shape[1:])
        if accum == 1:
            grads, metrics = micro(params, frozen, jax.tree_util.tree_map(lambda a: a[0], batch), keys[0])
        else:
            # Micro-batch by micro-batch (frozen encode included), so peak memory is that of one micro-batch.
            # XLA:CPU runs weight-gradient convolutions inside a while loop ~100x slower than outside one, so
            # on CPU (tests, demos) the loop is unrolled.
            def body(carry, xs):
                out = micro(params, frozen, *xs)
                return jax.tree_util.tree_map(jnp.add, carry, out), None
            first = jax.tree_util.tree_map(lambda a: a[0], (batch, keys))
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                           jax.eval_shape(lambda: micro(params, frozen, *first)))
            (grads, metrics), _ = jax.lax.scan(body, zeros, (batch, keys),
                                               unroll=accum if jax.default_backend() == "cpu" else 1)
            grads, metrics = jax.tree_util.tree_map(lambda a: a / accum, (grads, metrics))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state,
               "rng": state["rng"]}
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(schedule(state["step"]), jnp.float32)}
        if return_grads:
            metrics["grads"] = grads
        return new, metrics

    return step
