"""Samplers for the jitted denoising loop: DDIM, UniPC and LCM with diffusers 0.29.2 semantics, and the ANS.

Usage inside one `jax.lax.scan` (the scheduler is built once on the host per (config, number of steps)):

    sched = scheduler_from_config("<sd15>/scheduler", kind="unipc", num_inference_steps=20)
    coeffs = ans_coefficients(sched, level=900, mode="paper")
    z = ans_latents(z_lr, n1, n2, coeffs)
    def body(carry, i):
        t = jnp.asarray(sched.timesteps, jnp.int32)[i]
        eps = model(carry.sample, t)
        _, carry = sched.step(carry, i, eps, noise[i]) if sched.needs_step_noise else sched.step(carry, i, eps)
        return carry, None
    carry, _ = jax.lax.scan(body, sched.init_carry(z), jnp.arange(sched.num_inference_steps))

Step noise: `sched.needs_step_noise` says whether `step` takes a 4th argument, one sample-shaped N(0, I) draw per
step ([N, *z.shape] for the scan); `sched.step_noise_used` [N] says which steps read it. DDIM with eta > 0 uses
all N; LCM uses steps 0..N-2 (the last returns the denoised sample; its draw may be zeros); UniPC none.
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

from pasd_jax.schedulers.ans import (ANS_MODES, ANSCoefficients, add_noise, ans_coefficients, ans_latents,
                                     ans_latents_from_key, pure_noise_latents, pure_noise_latents_from_key)
from pasd_jax.schedulers.config import SchedulerConfigError, check_config, ignored_keys
from pasd_jax.schedulers.ddim import DDIMCarry, DDIMScheduler, make_ddim
from pasd_jax.schedulers.lcm import LCMCarry, LCMScheduler, make_lcm
from pasd_jax.schedulers.schedule import effective_config, load_config, make_betas, rescale_betas_zero_snr
from pasd_jax.schedulers.unipc import UniPCCarry, UniPCScheduler, make_unipc

SCHEDULER_KINDS = ("ddim", "unipc", "lcm")
Scheduler = DDIMScheduler | UniPCScheduler | LCMScheduler


def scheduler_from_config(config: Mapping[str, Any] | str | pathlib.Path, kind: str = "unipc",
                          num_inference_steps: int = 20, *, eta: float = 0.0, **overrides: Any) -> Scheduler:
    """Build a scheduler from a diffusers scheduler config (dict, json file, scheduler folder or pipeline folder).

    The config is resolved as `<Kind>Scheduler.from_config` would (class defaults + the file's keys that are
    arguments of the class, minus its `_use_default_values`), then `overrides` (config keys, e.g.
    timestep_spacing="trailing") apply. A value this implementation does not honour raises
    `SchedulerConfigError` naming the key; keys the class does not have are ignored, as diffusers ignores them.
    kind "lcm" on the SD1.5 file is what the official `LCMScheduler.from_config(pipe.scheduler.config)` builds.
    `eta` is DDIM's stochasticity.
    """
    cfg = effective_config(load_config(config), kind, **overrides)
    if kind == "ddim":
        return make_ddim(cfg, num_inference_steps, eta=eta)
    if eta:
        raise ValueError(f"eta only applies to the ddim scheduler, not {kind}")
    if kind == "lcm":
        return make_lcm(cfg, num_inference_steps)
    return make_unipc(cfg, num_inference_steps)


__all__ = [
    "ANS_MODES", "ANSCoefficients", "DDIMCarry", "DDIMScheduler", "LCMCarry", "LCMScheduler", "SCHEDULER_KINDS",
    "Scheduler", "SchedulerConfigError", "UniPCCarry", "UniPCScheduler", "add_noise", "ans_coefficients",
    "ans_latents", "ans_latents_from_key", "check_config", "effective_config", "ignored_keys", "load_config",
    "make_betas", "make_ddim", "make_lcm", "make_unipc", "pure_noise_latents", "pure_noise_latents_from_key",
    "rescale_betas_zero_snr", "scheduler_from_config",
]
