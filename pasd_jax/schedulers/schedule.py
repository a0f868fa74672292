"""Noise schedules and timestep spacing with the semantics of diffusers 0.29.2 scheduler configs.

Everything here runs on the host in numpy, once per (config, number of steps). The tables are float32 and are
computed with the same float32 operations, in the same order, as the PyTorch schedulers, so that the sampler and
the adjustable noise schedule reproduce the official numbers to the last few ulps.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

# Config resolution lives in `config`; re-exported here for the callers that import it from this module.
from pasd_jax.schedulers.config import (DDIM_DEFAULTS, DEFAULTS, LCM_DEFAULTS, UNIPC_DEFAULTS,  # noqa: F401
                                        SchedulerConfigError, check_config, effective_config, freeze_config,
                                        load_config)
from pasd_jax.schedulers.prediction import compute_dtype  # noqa: F401

F32 = np.float32


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=float32)` on CPU: float32 step, each half anchored at its end, and
    each element one fused multiply-add (the compiled kernel contracts `start + step * idx`). The float64 form
    below is that fma: the float32 product is exact in float64, and so is the sum for schedule-sized ranges, so
    the only rounding is the final one to float32."""
    start32, end32 = F32(start), F32(end)
    if steps == 1:
        return np.array([start32], dtype=F32)
    step = np.float64(F32((end32 - start32) / F32(steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    halfway = steps // 2
    out = np.empty(steps, dtype=F32)
    out[:halfway] = (np.float64(start32) + step * idx[:halfway]).astype(F32)
    out[halfway:] = (np.float64(end32) - step * (steps - idx[halfway:] - 1)).astype(F32)
    return out


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide cosine schedule (`squaredcos_cap_v2`), computed in float64 and stored as float32 as diffusers does."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=F32)


def rescale_betas_zero_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32 as diffusers does."""
    betas = np.asarray(betas, dtype=F32)
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(F32(1) - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (F32(1) - alphas).astype(F32)


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """float32 betas of a (resolved) scheduler config: trained, linear, scaled_linear or squaredcos_cap_v2."""
    n = int(config["num_train_timesteps"])
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=F32)
    elif schedule == "linear":
        betas = _linspace_f32(config["beta_start"], config["beta_end"], n)
    elif schedule == "scaled_linear":
        # The latent-diffusion schedule: linear in sqrt(beta).
        betas = _linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise NotImplementedError(f"beta_schedule {schedule!r} is not supported "
                                  "(linear, scaled_linear, squaredcos_cap_v2, or trained_betas)")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_betas_zero_snr(betas)
    return betas.astype(F32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of a float32 tensor on CPU: the running product is kept in float64, each output rounded."""
    return np.cumprod(np.asarray(x, dtype=F32).astype(np.float64)).astype(F32)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), float32, as the PyTorch schedulers compute it."""
    return _cumprod_f32(F32(1) - np.asarray(betas, dtype=F32))


def spaced_timesteps(num_inference_steps: int, *, spacing: str, num_train_timesteps: int = 1000,
                     steps_offset: int = 0, multistep: bool = False) -> np.ndarray:
    """Inference timesteps (descending, int64) for a timestep spacing (Lin et al. 2023, table 2).

    `multistep=True` gives the UniPC/DPM-Solver variant of diffusers 0.29.2, which for `linspace` and `leading`
    places num_inference_steps + 1 points and drops the last one (t = 0), so the final step goes to sigma 0.
    DDIM uses num_inference_steps points. `trailing` is the same for both.
    """
    n, big_t = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= big_t:
        raise ValueError(f"num_inference_steps must be in [1, {big_t}], got {n}")
    points = n + 1 if multistep else n
    if spacing == "linspace":
        t = np.linspace(0, big_t - 1, points).round()[::-1]
        t = t[:-1] if multistep else t
        return t.copy().astype(np.int64)
    if spacing == "leading":
        ratio = big_t // points
        t = (np.arange(0, points) * ratio).round()[::-1]
        t = t[:-1] if multistep else t
        t = t.copy().astype(np.int64) + int(steps_offset)
        if t.max() >= big_t:
            raise SchedulerConfigError(
                f"scheduler config: steps_offset={steps_offset} pushes the leading timesteps to {int(t.max())}, past "
                f"the training schedule; supported: steps_offset < {big_t - int(t.max()) + int(steps_offset)}")
        return t
    if spacing == "trailing":
        ratio = big_t / n
        return np.round(np.arange(big_t, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported: expected linspace, leading or trailing")


def sigma_to_alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VP (alpha_t, sigma_t) from the EDM-style sigma = sqrt((1 - abar) / abar), in float32."""
    sigma = np.asarray(sigma, dtype=F32)
    alpha_t = F32(1) / np.sqrt(sigma * sigma + F32(1))
    return alpha_t.astype(F32), (sigma * alpha_t).astype(F32)


def karras_sigmas(all_sigmas: np.ndarray, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Karras et al. (2022) rho=7 sigmas between the schedule's extremes, and the (float, rounded) timesteps
    interpolated back in log-sigma, as diffusers 0.29.2 UniPC's `use_karras_sigmas` computes them (float64)."""
    all_sigmas = np.asarray(all_sigmas, dtype=F32)
    log_sigmas = np.log(all_sigmas)
    sigma_min, sigma_max = float(all_sigmas[0]), float(all_sigmas[-1])
    rho = 7.0
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    timesteps = np.array([_sigma_to_t(sig, log_sigmas) for sig in sigmas]).round()
    return sigmas, timesteps.astype(np.int64)


def _sigma_to_t(sigma: np.float64, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a sigma: linear interpolation of log sigma between its two neighbours."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def refuse_undefined_x0(kind: str, config: Mapping[str, Any], timesteps: np.ndarray,
                        alphas_cumprod: np.ndarray) -> None:
    """abar_t = 0 (zero terminal SNR at t = T-1) makes epsilon's x0 = (x - eps) / 0: diffusers gives inf/NaN."""
    hit = [int(t) for t in np.asarray(timesteps) if float(alphas_cumprod[int(t)]) == 0.0]
    if hit and config["prediction_type"] == "epsilon":
        raise SchedulerConfigError(
            f"{kind} scheduler config: prediction_type='epsilon' with rescale_betas_zero_snr=True is not supported "
            f"when the schedule visits t={hit[0]} (alphas_cumprod = 0 there, so x0 = (x - eps) / 0 and diffusers "
            f"returns inf/NaN); supported: prediction_type='v_prediction' (zero-SNR models are trained with it), "
            f"or a schedule that does not reach t={hit[0]}")
