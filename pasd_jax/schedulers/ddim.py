"""DDIM (Song et al. 2021) with the semantics of diffusers 0.29.2 `DDIMScheduler`, as a pure step for `lax.scan`.

The scheduler is built on the host once per (config, number of steps). All per-step scalars are precomputed as
float32 tables, indexed inside `step` with the (possibly traced) step index `i`, so the whole denoising loop is one
compiled program. Steps must run in order i = 0 .. N-1.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import struct

from pasd_jax.schedulers import schedule as sch
from pasd_jax.schedulers.prediction import compute_dtype, regularize_x0, x0_and_eps

F32 = np.float32


class DDIMCarry(NamedTuple):
    """DDIM keeps no history: the carry is the current sample only."""
    sample: jnp.ndarray


@struct.dataclass
class DDIMScheduler:
    """Precomputed DDIM tables. A pytree: the arrays are leaves, the config is static."""
    timesteps: np.ndarray            # [N] int: model timestep of step i
    alphas_cumprod: np.ndarray       # [T] float32 training schedule
    sqrt_alpha_t: np.ndarray         # [N] sqrt(abar_t)
    sqrt_beta_t: np.ndarray          # [N] sqrt(1 - abar_t)
    sqrt_alpha_prev: np.ndarray      # [N] sqrt(abar_prev)
    direction_coef: np.ndarray       # [N] sqrt(1 - abar_prev - std^2)
    std_dev: np.ndarray              # [N] eta * sqrt(variance)
    config: Mapping[str, Any] = struct.field(pytree_node=False)
    eta: float = struct.field(pytree_node=False, default=0.0)

    kind = "ddim"
    init_noise_sigma = 1.0

    @property
    def num_inference_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    def init_carry(self, sample: jnp.ndarray) -> DDIMCarry:
        return DDIMCarry(sample=sample)

    @property
    def needs_step_noise(self) -> bool:
        """Whether `step` takes a per-step N(0, I) draw (eta > 0): one sample-shaped array at every step."""
        return self.eta > 0

    @property
    def step_noise_used(self) -> np.ndarray:
        """[N] bool: the steps whose noise argument is used."""
        return np.full(self.num_inference_steps, self.needs_step_noise)

    def step(self, carry: DDIMCarry, i: Any, model_output: jnp.ndarray,
             variance_noise: jnp.ndarray | None = None) -> tuple[jnp.ndarray, DDIMCarry]:
        """x_t -> x_{t_prev} (DDIM eq. 12), in float32 whatever the sample dtype, returned in the sample's dtype.
        `variance_noise` (N(0, I), sample-shaped) is required when eta > 0."""
        out_dtype = carry.sample.dtype
        dtype = compute_dtype(out_dtype)
        x = carry.sample.astype(dtype)
        model_output = model_output.astype(dtype)
        take = lambda table: jnp.asarray(table)[i].astype(dtype)  # noqa: E731
        x0, eps = x0_and_eps(self.config["prediction_type"], x, model_output, take(self.sqrt_alpha_t),
                             take(self.sqrt_beta_t))
        x0 = regularize_x0(x0, self.config)
        prev = take(self.sqrt_alpha_prev) * x0 + take(self.direction_coef) * eps
        if self.eta > 0:
            if variance_noise is None:
                raise ValueError("DDIM with eta > 0 needs variance_noise (draw it from an explicit PRNG key)")
            prev = prev + take(self.std_dev) * variance_noise.astype(dtype)
        prev = prev.astype(out_dtype)
        return prev, DDIMCarry(sample=prev)

    def official_add_noise_coefficients(self, timestep: int) -> tuple[np.float32, np.float32]:
        """(signal, noise) multipliers of diffusers' DDIM `add_noise` at an integer timestep: alphas_cumprod[t]."""
        return ddpm_add_noise_coefficients(self.alphas_cumprod, timestep)


def ddpm_add_noise_coefficients(alphas_cumprod: np.ndarray, timestep: int) -> tuple[np.float32, np.float32]:
    """sqrt(abar_t), sqrt(1 - abar_t) in float32, with abar indexed by the training timestep t."""
    t = int(timestep)
    if not 0 <= t < len(alphas_cumprod):
        raise ValueError(f"timestep {t} outside the training schedule [0, {len(alphas_cumprod) - 1}]")
    abar = F32(alphas_cumprod[t])
    return F32(np.sqrt(abar)), F32(np.sqrt(F32(1) - abar))


def make_ddim(config: Mapping[str, Any], num_inference_steps: int, *, eta: float = 0.0) -> DDIMScheduler:
    """Build the DDIM tables from a resolved config (see `config.effective_config`)."""
    sch.check_config(config, "ddim")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    big_t = int(config["num_train_timesteps"])
    alphas_cumprod = sch.alphas_cumprod_from_betas(sch.make_betas(config))
    final_alpha = F32(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0]
    timesteps = sch.spaced_timesteps(num_inference_steps, spacing=config["timestep_spacing"],
                                     num_train_timesteps=big_t, steps_offset=config["steps_offset"])
    # diffusers steps back by T // N whatever the spacing.
    prev_timesteps = timesteps - big_t // num_inference_steps
    sch.refuse_undefined_x0("ddim", config, timesteps, alphas_cumprod)
    a_t = alphas_cumprod[timesteps]
    a_prev = np.where(prev_timesteps >= 0, alphas_cumprod[np.maximum(prev_timesteps, 0)], final_alpha).astype(F32)
    b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
    variance = (b_prev / b_t) * (F32(1) - a_t / a_prev)
    std = (F32(eta) * np.sqrt(variance)).astype(F32)
    return DDIMScheduler(
        timesteps=timesteps,
        alphas_cumprod=alphas_cumprod,
        sqrt_alpha_t=np.sqrt(a_t).astype(F32),
        sqrt_beta_t=np.sqrt(b_t).astype(F32),
        sqrt_alpha_prev=np.sqrt(a_prev).astype(F32),
        direction_coef=np.sqrt(F32(1) - a_prev - std * std).astype(F32),
        std_dev=std,
        config=sch.freeze_config(config),
        eta=float(eta),
    )
