"""The adjustable noise schedule (ANS, PASD paper Eq. 4) and the pure-noise start of the official pipeline.

The official `prepare_latents` noises the LQ latent twice, with two fresh N(0, I) draws:
    z = add_noise(z_LR, n1, timesteps[0]);   z_N = add_noise(z, n2, added_noise_level) * init_noise_sigma
Each add_noise is signal * x + noise * eps. Which signal/noise pair the second call uses depends on the scheduler
(spec section 4.5, appendix A1):

- mode "paper": both calls index the training schedule, sqrt(abar[t]) and sqrt(1 - abar[t]) (the paper, DDIM, and
  UniPC in diffusers <= 0.24). z_N = sqrt(abar_a * abar_t0) * z_LR + ...; for SD1.5, level 900 and t0 = 999 the
  LR-signal coefficient is 0.00812.
- mode "official": what diffusers 0.29.2's `add_noise` of the chosen scheduler does. DDIM and LCM index
  alphas_cumprod[t] directly, so they are the same as "paper" (the official `--use_lcm_lora` run really noises
  at level 900; t0 = timesteps[0] = 999 for LCM). UniPC looks the timestep up in the *inference* schedule and
  falls back to the last step when it is missing, so level 900 with 20 steps uses the noise of t = 50 and the
  LR-signal coefficient is 0.0666.

The multipliers are float32 numbers computed on the host, and `add_noise` applies them in float32 whatever the
latent dtype: with a zero-terminal-SNR schedule UniPC's sigma at t = 999 is 4096, and the official fp16 add_noise
squares it to inf (alpha = sigma_t = 0, a zero latent).

The noise draws are arguments (so goldens can inject the recorded ones); `*_from_key` helpers draw them from an
explicit PRNG key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.schedulers.ddim import ddpm_add_noise_coefficients
from pasd_jax.schedulers.prediction import compute_dtype

ANS_MODES = ("paper", "official")
F32 = np.float32


@dataclasses.dataclass(frozen=True)
class ANSCoefficients:
    """The two add_noise calls as (signal, noise) multipliers, and the timesteps they were meant for."""
    first: tuple[np.float32, np.float32]    # add_noise at timesteps[0]
    second: tuple[np.float32, np.float32]   # add_noise at the added-noise level
    first_timestep: int
    level: int
    mode: str

    @property
    def lr_signal(self) -> float:
        """Overall multiplier of z_LR in z_N (float64 product)."""
        return float(self.first[0]) * float(self.second[0])

    @property
    def noise_scale(self) -> float:
        """Standard deviation of the total noise in z_N: sqrt(1 - (a1*a2)^2) for a VP schedule."""
        a1, s1 = map(float, self.first)
        a2, s2 = map(float, self.second)
        return float(np.sqrt((a2 * s1) ** 2 + s2 ** 2))


def ans_coefficients(scheduler: Any, level: int = 900, mode: str = "paper") -> ANSCoefficients:
    """The ANS add_noise multipliers for a built scheduler (DDIM, UniPC or LCM), computed on the host in float32.

    "paper" indexes the training schedule at timesteps[0] and at `level`; "official" calls the scheduler's own
    diffusers 0.29.2 add_noise rule (identical to "paper" for DDIM and LCM, the last-index fallback for UniPC)."""
    if mode not in ANS_MODES:
        raise ValueError(f"ans mode must be one of {ANS_MODES}, got {mode!r}")
    level = int(level)
    num_train = len(scheduler.alphas_cumprod)
    if not 0 <= level < num_train:
        raise ValueError(f"added noise level {level} outside the training schedule [0, {num_train - 1}]")
    t0 = int(np.asarray(scheduler.timesteps)[0])
    if mode == "paper":
        first = ddpm_add_noise_coefficients(scheduler.alphas_cumprod, t0)
        second = ddpm_add_noise_coefficients(scheduler.alphas_cumprod, level)
    else:
        first = scheduler.official_add_noise_coefficients(t0)
        second = scheduler.official_add_noise_coefficients(level)
    return ANSCoefficients(first=first, second=second, first_timestep=t0, level=level, mode=mode)


def add_noise(x: jnp.ndarray, noise: jnp.ndarray, signal: Any, noise_coef: Any) -> jnp.ndarray:
    """signal * x + noise_coef * noise (the diffusers add_noise, coefficients given), computed in float32 and
    returned in x's dtype."""
    dtype = compute_dtype(x.dtype)
    out = jnp.asarray(signal, dtype) * x.astype(dtype) + jnp.asarray(noise_coef, dtype) * noise.astype(dtype)
    return out.astype(x.dtype)


def ans_latents(z_lr: jnp.ndarray, noise1: jnp.ndarray, noise2: jnp.ndarray, coeffs: ANSCoefficients,
                init_noise_sigma: float = 1.0) -> jnp.ndarray:
    """z_N from the (scaled) LQ latent z_LR = 0.18215 * posterior sample and two N(0, I) draws, in draw order."""
    dtype = compute_dtype(z_lr.dtype)
    z = add_noise(z_lr.astype(dtype), noise1, *coeffs.first)
    z = add_noise(z, noise2, *coeffs.second)
    return (z * jnp.asarray(init_noise_sigma, dtype)).astype(z_lr.dtype)


def ans_latents_from_key(z_lr: jnp.ndarray, key: jax.Array, coeffs: ANSCoefficients,
                         init_noise_sigma: float = 1.0) -> jnp.ndarray:
    """`ans_latents` with the two draws taken from an explicit PRNG key."""
    k1, k2 = jax.random.split(key)
    n1 = jax.random.normal(k1, z_lr.shape, z_lr.dtype)
    n2 = jax.random.normal(k2, z_lr.shape, z_lr.dtype)
    return ans_latents(z_lr, n1, n2, coeffs, init_noise_sigma)


def pure_noise_latents(noise: jnp.ndarray, offset_noise: jnp.ndarray | None = None,
                       offset_noise_scale: float = 0.0, init_noise_sigma: float = 1.0) -> jnp.ndarray:
    """The `--init-noise` start (no ANS): noise + offset_noise_scale * offset_noise, times init_noise_sigma.

    `offset_noise` is per channel, shape [B, C, 1, 1] for NCHW noise (the official draws it from the global RNG).
    """
    dtype = compute_dtype(noise.dtype)
    z = noise.astype(dtype)
    if offset_noise is not None and offset_noise_scale != 0.0:
        z = z + jnp.asarray(offset_noise_scale, dtype) * offset_noise.astype(dtype)
    return (z * jnp.asarray(init_noise_sigma, dtype)).astype(noise.dtype)


def pure_noise_latents_from_key(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32,
                                offset_noise_scale: float = 0.0, init_noise_sigma: float = 1.0) -> jnp.ndarray:
    """`pure_noise_latents` with draws from an explicit key; `shape` is NCHW, the offset noise is [N, C, 1, 1]."""
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, tuple(shape), dtype)
    offset = jax.random.normal(k2, tuple(shape[:2]) + (1,) * (len(shape) - 2), dtype)
    return pure_noise_latents(noise, offset, offset_noise_scale, init_noise_sigma)
