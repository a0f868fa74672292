"""Latent consistency model sampling (Luo et al. 2023) with the semantics of diffusers 0.29.2 `LCMScheduler`.

What the official `test_pasd.py --use_lcm_lora` samples with (`LCMScheduler.from_config(<UniPC config>)`). Each
step maps x_t to the consistency function's output
    denoised = c_out(t) * x0(x_t, model_output) + c_skip(t) * x_t
(boundary scalings with sigma_data 0.5 and `timestep_scaling`), then, except at the last step, re-noises it to the
next timestep with a fresh N(0, I) draw:  x_next = sqrt(abar_next) * denoised + sqrt(1 - abar_next) * noise.
The last step returns `denoised`.

The draw is an argument of `step` (the sampler takes it from its own PRNG keys, one sample-shaped array per step,
as DDIM's eta noise), so the whole loop is one `lax.scan` with a traced step index. All tables are float32 on the
host; the step computes in float32 whatever the sample dtype.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import struct

from pasd_jax.schedulers import schedule as sch
from pasd_jax.schedulers.ddim import ddpm_add_noise_coefficients
from pasd_jax.schedulers.prediction import compute_dtype, regularize_x0, x0_and_eps

F32 = np.float32
SIGMA_DATA = 0.5


class LCMCarry(NamedTuple):
    """The current sample and the last consistency output (`denoised`, float32; the sample itself before step 0)."""
    sample: jnp.ndarray
    denoised: jnp.ndarray


@struct.dataclass
class LCMScheduler:
    """Precomputed LCM tables ([N] float32). A pytree: the arrays are leaves, the config is static."""
    timesteps: np.ndarray        # [N] int: model timestep of step i
    alphas_cumprod: np.ndarray   # [T] float32 training schedule
    sqrt_alpha_t: np.ndarray     # [N] sqrt(abar_t)
    sqrt_beta_t: np.ndarray      # [N] sqrt(1 - abar_t)
    c_skip: np.ndarray           # [N] boundary scalings of the consistency parameterisation
    c_out: np.ndarray
    sqrt_alpha_next: np.ndarray  # [N] sqrt(abar) of the next timestep (1 at the last step, unused there)
    sqrt_beta_next: np.ndarray   # [N] sqrt(1 - abar) of the next timestep (0 at the last step, unused there)
    config: Mapping[str, Any] = struct.field(pytree_node=False)

    kind = "lcm"
    init_noise_sigma = 1.0

    @property
    def num_inference_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    @property
    def needs_step_noise(self) -> bool:
        """Whether `step` needs its noise argument: yes, unless the schedule has a single step."""
        return self.num_inference_steps > 1

    @property
    def step_noise_used(self) -> np.ndarray:
        """[N] bool: every step but the last re-noises with its draw (the official one draw per step 0..N-2)."""
        return np.arange(self.num_inference_steps) < self.num_inference_steps - 1

    def init_carry(self, sample: jnp.ndarray) -> LCMCarry:
        return LCMCarry(sample=sample, denoised=sample.astype(compute_dtype(sample.dtype)))

    def step(self, carry: LCMCarry, i: Any, model_output: jnp.ndarray,
             noise: jnp.ndarray | None = None) -> tuple[jnp.ndarray, LCMCarry]:
        """x_t -> x_next (or the final `denoised` at i = N-1), returned in the sample's dtype.

        `noise` is the step's N(0, I) draw, sample-shaped; it is required when N > 1 (the index may be traced) and
        ignored at the last step, which the official scheduler leaves without a draw."""
        out_dtype = carry.sample.dtype
        dtype = compute_dtype(out_dtype)
        x = carry.sample.astype(dtype)
        model_output = model_output.astype(dtype)
        take = lambda table: jnp.asarray(table)[i].astype(dtype)  # noqa: E731
        x0, _ = x0_and_eps(self.config["prediction_type"], x, model_output, take(self.sqrt_alpha_t),
                           take(self.sqrt_beta_t), need_eps=False)
        x0 = regularize_x0(x0, self.config)
        denoised = take(self.c_out) * x0 + take(self.c_skip) * x
        if self.num_inference_steps == 1:
            prev = denoised
        else:
            if noise is None:
                raise ValueError("LCM with more than one step needs the step's noise (a sample-shaped N(0, I) draw "
                                 "from an explicit PRNG key; the last step ignores it)")
            renoised = take(self.sqrt_alpha_next) * denoised + take(self.sqrt_beta_next) * noise.astype(dtype)
            last = jnp.asarray(i) == self.num_inference_steps - 1
            prev = jnp.where(last, denoised, renoised)
        prev = prev.astype(out_dtype)
        return prev, LCMCarry(sample=prev, denoised=denoised)

    def official_add_noise_coefficients(self, timestep: int) -> tuple[np.float32, np.float32]:
        """(signal, noise) multipliers of diffusers' LCM `add_noise`: alphas_cumprod[t] of any training timestep
        (no lookup in the inference schedule, unlike UniPC), so the ANS level means what it says."""
        return ddpm_add_noise_coefficients(self.alphas_cumprod, timestep)


def lcm_timesteps(num_inference_steps: int, original_inference_steps: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers 0.29.2 LCM schedule (strength 1): N evenly spaced indices into the `original_inference_steps`
    skipping-step schedule k*j - 1 (k = T // original), descending from T - 1."""
    n, orig, big_t = int(num_inference_steps), int(original_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= big_t:
        raise ValueError(f"num_inference_steps must be in [1, {big_t}], got {n}")
    if n > orig:
        raise ValueError(f"LCM num_inference_steps={n} cannot exceed original_inference_steps={orig}: the schedule "
                         f"is a subset of the {orig}-step distillation schedule (raise original_inference_steps)")
    k = big_t // orig
    origin = (np.arange(1, orig + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.int64)


def boundary_scalings(timesteps: np.ndarray, timestep_scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) in float32 as LCMScheduler computes them from the integer timestep tensor."""
    s = np.asarray(timesteps).astype(F32) * F32(timestep_scaling)
    denom = s * s + F32(SIGMA_DATA ** 2)
    c_skip = (F32(SIGMA_DATA ** 2) / denom).astype(F32)
    c_out = (s / np.sqrt(denom)).astype(F32)
    return c_skip, c_out


def make_lcm(config: Mapping[str, Any], num_inference_steps: int) -> LCMScheduler:
    """Build the LCM tables from a resolved config (see `config.effective_config`)."""
    sch.check_config(config, "lcm")
    alphas_cumprod = sch.alphas_cumprod_from_betas(sch.make_betas(config))
    timesteps = lcm_timesteps(num_inference_steps, config["original_inference_steps"],
                              config["num_train_timesteps"])
    sch.refuse_undefined_x0("lcm", config, timesteps, alphas_cumprod)
    a_t = alphas_cumprod[timesteps]
    a_next = np.concatenate([alphas_cumprod[timesteps[1:]], [F32(1)]]).astype(F32)
    c_skip, c_out = boundary_scalings(timesteps, config["timestep_scaling"])
    return LCMScheduler(
        timesteps=timesteps,
        alphas_cumprod=alphas_cumprod,
        sqrt_alpha_t=np.sqrt(a_t).astype(F32),
        sqrt_beta_t=np.sqrt(F32(1) - a_t).astype(F32),
        c_skip=c_skip,
        c_out=c_out,
        sqrt_alpha_next=np.sqrt(a_next).astype(F32),
        sqrt_beta_next=np.sqrt(F32(1) - a_next).astype(F32),
        config=sch.freeze_config(config),
    )
