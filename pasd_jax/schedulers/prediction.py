"""Traced helpers shared by the steps: the float32 compute dtype, the model output as x0, and x0 clipping or
dynamic thresholding (diffusers 0.29.2 semantics)."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp


def compute_dtype(dtype: Any):
    """Scheduler arithmetic runs in at least float32 whatever the latent dtype: zero-terminal-SNR schedules have
    coefficients (sigma 4096, c_skip 2.5e-9) that half precision squares to inf or flushes to zero."""
    return jnp.promote_types(dtype, jnp.float32)


def x0_and_eps(prediction_type: str, x: jnp.ndarray, model_output: jnp.ndarray, sqrt_alpha: jnp.ndarray,
               sqrt_beta: jnp.ndarray, need_eps: bool = True) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """(x0, eps) from the network output, for x = sqrt_alpha * x0 + sqrt_beta * eps (DDIM / LCM form)."""
    if prediction_type == "epsilon":
        return (x - sqrt_beta * model_output) / sqrt_alpha, model_output
    if prediction_type == "sample":
        eps = (x - sqrt_alpha * model_output) / sqrt_beta if need_eps else None
        return model_output, eps
    x0 = sqrt_alpha * x - sqrt_beta * model_output  # v_prediction
    return x0, (sqrt_alpha * model_output + sqrt_beta * x) if need_eps else None


def dynamic_threshold(x0: jnp.ndarray, ratio: float, max_value: float) -> jnp.ndarray:
    """Imagen's dynamic thresholding per sample: s = clamp(quantile(|x0|, ratio), 1, max_value); clip to [-s, s]
    and divide by s (torch.quantile's linear interpolation)."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1, method="linear")
    s = jnp.minimum(jnp.maximum(s, 1.0), max_value).astype(x0.dtype)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def regularize_x0(x0: jnp.ndarray, config: Mapping[str, Any]) -> jnp.ndarray:
    """diffusers' order: dynamic thresholding if enabled, else `clip_sample` (for the schedulers that have it)."""
    if config["thresholding"]:
        return dynamic_threshold(x0, float(config["dynamic_thresholding_ratio"]), float(config["sample_max_value"]))
    if config.get("clip_sample", False):
        r = float(config["clip_sample_range"])
        return jnp.clip(x0, -r, r)
    return x0
