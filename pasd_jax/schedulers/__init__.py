"""Samplers for the jitted denoising loop: DDIM and UniPC-bh2 with diffusers 0.29.2 semantics, and the ANS.

Usage inside one `jax.lax.scan` (the scheduler is built once on the host per (config, number of steps)):

    sched = scheduler_from_config("<sd15>/scheduler", kind="unipc", num_inference_steps=20)
    coeffs = ans_coefficients(sched, level=900, mode="paper")
    z = ans_latents(z_lr, n1, n2, coeffs)
    def body(carry, i):
        t = jnp.asarray(sched.timesteps, jnp.int32)[i]
        eps = model(carry.sample, t)
        _, carry = sched.step(carry, i, eps)
        return carry, None
    carry, _ = jax.lax.scan(body, sched.init_carry(z), jnp.arange(sched.num_inference_steps))
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

from pasd_jax.schedulers.ans import (ANS_MODES, ANSCoefficients, add_noise, ans_coefficients, ans_latents,
                                     ans_latents_from_key, pure_noise_latents, pure_noise_latents_from_key)
from pasd_jax.schedulers.ddim import DDIMCarry, DDIMScheduler, make_ddim
from pasd_jax.schedulers.schedule import effective_config, load_config, make_betas, rescale_betas_zero_snr
from pasd_jax.schedulers.unipc import UniPCCarry, UniPCScheduler, make_unipc

SCHEDULER_KINDS = ("ddim", "unipc")
Scheduler = DDIMScheduler | UniPCScheduler


def scheduler_from_config(config: Mapping[str, Any] | str | pathlib.Path, kind: str = "unipc",
                          num_inference_steps: int = 20, *, eta: float = 0.0, **overrides: Any) -> Scheduler:
    """Build a scheduler from a diffusers scheduler config (dict, json file, scheduler folder or pipeline folder).

    The config is resolved as `<Kind>Scheduler.from_pretrained` would (class defaults + known keys of the file),
    then `overrides` (config keys, e.g. timestep_spacing="trailing") apply. `eta` is DDIM's stochasticity.
    """
    cfg = effective_config(load_config(config), kind, **overrides)
    if kind == "ddim":
        return make_ddim(cfg, num_inference_steps, eta=eta)
    if eta:
        raise ValueError("eta only applies to the ddim scheduler")
    return make_unipc(cfg, num_inference_steps)


__all__ = [
    "ANS_MODES", "ANSCoefficients", "DDIMCarry", "DDIMScheduler", "SCHEDULER_KINDS", "Scheduler", "UniPCCarry",
    "UniPCScheduler", "add_noise", "ans_coefficients", "ans_latents", "ans_latents_from_key", "effective_config",
    "load_config", "make_betas", "make_ddim", "make_unipc", "pure_noise_latents", "pure_noise_latents_from_key",
    "rescale_betas_zero_snr", "scheduler_from_config",
]
