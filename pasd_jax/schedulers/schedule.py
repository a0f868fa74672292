"""Noise schedules and timestep spacing with the semantics of diffusers 0.29.2 scheduler configs.

Everything here runs on the host in numpy, once per (config, number of steps). The tables are float32 and are
computed with the same float32 operations, in the same order, as the PyTorch schedulers, so that the sampler and
the adjustable noise schedule reproduce the official numbers to the last few ulps.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping

import numpy as np

F32 = np.float32

# Init arguments (and defaults) of diffusers 0.29.2 DDIMScheduler / UniPCMultistepScheduler. A config file is
# resolved as diffusers' `from_pretrained` does: these defaults, updated with the file's keys that are arguments of
# the class; every other key (e.g. the PNDM `skip_prk_steps`) is ignored.
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

UNIPC_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
}

DEFAULTS = {"ddim": DDIM_DEFAULTS, "unipc": UNIPC_DEFAULTS}


def load_config(config_or_path: Mapping[str, Any] | str | pathlib.Path) -> dict[str, Any]:
    """A scheduler config dict from a dict, a json file, a scheduler folder or a pipeline folder (`scheduler/`)."""
    if isinstance(config_or_path, Mapping):
        return dict(config_or_path)
    path = pathlib.Path(config_or_path)
    candidates = [path] if path.suffix == ".json" else [path / "scheduler_config.json",
                                                         path / "scheduler" / "scheduler_config.json"]
    for candidate in candidates:
        if candidate.is_file():
            with open(candidate) as f:
                return json.load(f)
    raise FileNotFoundError(
        f"no scheduler config at {path}: expected a scheduler_config.json file, a folder holding one, or a "
        f"diffusers pipeline folder with scheduler/scheduler_config.json")


def effective_config(config: Mapping[str, Any], kind: str, **overrides: Any) -> dict[str, Any]:
    """The config a diffusers `<kind>` scheduler would use: class defaults + the file's known keys + overrides."""
    if kind not in DEFAULTS:
        raise ValueError(f"unknown scheduler kind {kind!r}: expected one of {sorted(DEFAULTS)}")
    defaults = DEFAULTS[kind]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} scheduler option(s) {unknown}; known: {sorted(defaults)}")
    out = dict(defaults)
    out.update({k: v for k, v in config.items() if k in defaults})
    out.update(overrides)
    return out


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=float32)` on CPU: float32 step, each half anchored at its end."""
    start32, end32 = F32(start), F32(end)
    if steps == 1:
        return np.array([start32], dtype=F32)
    step = F32((end32 - start32) / F32(steps - 1))
    idx = np.arange(steps)
    halfway = steps // 2
    out = np.empty(steps, dtype=F32)
    out[:halfway] = start32 + step * idx[:halfway].astype(F32)
    out[halfway:] = end32 - step * (steps - idx[halfway:] - 1).astype(F32)
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
        return t.copy().astype(np.int64) + int(steps_offset)
    if spacing == "trailing":
        ratio = big_t / n
        return np.round(np.arange(big_t, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported: expected linspace, leading or trailing")


def sigma_to_alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VP (alpha_t, sigma_t) from the EDM-style sigma = sqrt((1 - abar) / abar), in float32."""
    sigma = np.asarray(sigma, dtype=F32)
    alpha_t = F32(1) / np.sqrt(sigma * sigma + F32(1))
    return alpha_t.astype(F32), (sigma * alpha_t).astype(F32)


def check_supported(config: Mapping[str, Any]) -> None:
    """Reject config options this implementation does not provide, rather than silently ignoring them."""
    if config.get("thresholding", False):
        raise NotImplementedError("dynamic thresholding is not supported (thresholding=True)")
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {config['prediction_type']!r}")


def freeze_config(config: Mapping[str, Any]):
    """A hashable copy of a config (lists become tuples), so schedulers can be static pytree metadata."""
    from flax.core import FrozenDict

    def freeze(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        if isinstance(v, np.ndarray):
            return tuple(v.tolist())
        return v
    return FrozenDict({k: freeze(v) for k, v in config.items()})


def compute_dtype(dtype: Any):
    """Scheduler arithmetic runs in at least float32 whatever the latent dtype."""
    import jax.numpy as jnp
    return jnp.promote_types(dtype, jnp.float32)
