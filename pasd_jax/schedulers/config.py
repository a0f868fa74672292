"""diffusers 0.29.2 scheduler configs: resolution (`from_config`), and refusal of what we do not implement.

A config file is resolved as diffusers' `<Class>.from_config` does: the class defaults, updated with the file's
keys that are `__init__` arguments of the class. Keys listed in the file's `_use_default_values` (written by
diffusers when it saves a config whose values were defaults of *another* class) are dropped first, so the target
class's own defaults apply: that is how the official `LCMScheduler.from_config(pipe.scheduler.config)` turns the
UniPC config of test_pasd.py into an LCM one. Every other key (`_class_name`, PNDM's `skip_prk_steps`, UniPC keys
given to DDIM, ...) is ignored, as diffusers ignores it: it cannot change the numbers.

`check_config` then refuses, with one line naming the key, its value and what is supported, every value of a
class key that this implementation would otherwise not honour.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import numpy as np

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}

DDIM_DEFAULTS: dict[str, Any] = {
    **_COMMON,
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
    **_COMMON,
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

# LCM's own defaults are SD's schedule. `set_alpha_to_one`, `steps_offset` and `timestep_spacing` are accepted (they
# are arguments of the class) but LCMScheduler 0.29.2 never reads them on the `num_inference_steps` path.
LCM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}

DEFAULTS = {"ddim": DDIM_DEFAULTS, "unipc": UNIPC_DEFAULTS, "lcm": LCM_DEFAULTS}

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
UNIPC_SOLVER_TYPES = ("bh1", "bh2", "midpoint", "heun", "logrho")   # the last three are bh2 in diffusers
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class SchedulerConfigError(ValueError):
    """A scheduler config value that this implementation does not provide (one-line message)."""


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
    """The config a diffusers `<kind>` scheduler would use: class defaults + the file's class keys + overrides."""
    if kind not in DEFAULTS:
        raise ValueError(f"unknown scheduler kind {kind!r}: expected one of {sorted(DEFAULTS)}")
    defaults = DEFAULTS[kind]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} scheduler option(s) {unknown}; known: {sorted(defaults)}")
    used_defaults = set(config.get("_use_default_values", ()))
    out = dict(defaults)
    out.update({k: v for k, v in config.items() if k in defaults and k not in used_defaults})
    out.update(overrides)
    return out


def ignored_keys(config: Mapping[str, Any], kind: str) -> list[str]:
    """The keys of a raw config that a diffusers `<kind>` scheduler ignores (they cannot change its numbers)."""
    used_defaults = set(config.get("_use_default_values", ()))
    return sorted(k for k in config if k not in DEFAULTS[kind] or k in used_defaults)


def _refuse(kind: str, key: str, value: Any, supported: str) -> SchedulerConfigError:
    return SchedulerConfigError(f"{kind} scheduler config: {key}={value!r} is not supported; supported: {supported}")


def _one_of(cfg: Mapping[str, Any], kind: str, key: str, allowed: tuple) -> None:
    if cfg[key] not in allowed:
        raise _refuse(kind, key, cfg[key], " or ".join(repr(a) for a in allowed))


def _flag(cfg: Mapping[str, Any], kind: str, key: str) -> None:
    if not isinstance(cfg[key], bool):
        raise _refuse(kind, key, cfg[key], "true or false")


def _positive(cfg: Mapping[str, Any], kind: str, key: str, integer: bool = False) -> None:
    value = cfg[key]
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value <= 0:
        raise _refuse(kind, key, value, "a positive integer" if integer else "a positive number")


def check_config(cfg: Mapping[str, Any], kind: str) -> None:
    """Refuse every value of a resolved `<kind>` config that would not be honoured (see the module docstring)."""
    _positive(cfg, kind, "num_train_timesteps", integer=True)
    betas = cfg["trained_betas"]
    if betas is not None:
        if len(betas) != cfg["num_train_timesteps"]:
            raise _refuse(kind, "trained_betas", f"<{len(betas)} values>",
                          f"one beta per training timestep (num_train_timesteps={cfg['num_train_timesteps']})")
    elif cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise _refuse(kind, "beta_schedule", cfg["beta_schedule"],
                      " or ".join(repr(b) for b in BETA_SCHEDULES) + ", or trained_betas")
    _one_of(cfg, kind, "prediction_type", PREDICTION_TYPES)
    for key in ("rescale_betas_zero_snr", "thresholding"):
        _flag(cfg, kind, key)
    if cfg["thresholding"]:
        ratio = cfg["dynamic_thresholding_ratio"]
        if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise _refuse(kind, "dynamic_thresholding_ratio", ratio, "a quantile in [0, 1]")
        _positive(cfg, kind, "sample_max_value")
    if kind in ("ddim", "lcm"):
        _flag(cfg, kind, "clip_sample")
        if cfg["clip_sample"]:
            _positive(cfg, kind, "clip_sample_range")
    if kind in ("ddim", "unipc"):
        _one_of(cfg, kind, "timestep_spacing", SPACINGS)
        if not isinstance(cfg["steps_offset"], int) or cfg["steps_offset"] < 0:
            raise _refuse(kind, "steps_offset", cfg["steps_offset"], "an integer >= 0")
    if kind == "ddim":
        _flag(cfg, kind, "set_alpha_to_one")
    if kind == "unipc":
        _positive(cfg, kind, "solver_order", integer=True)
        _one_of(cfg, kind, "solver_type", UNIPC_SOLVER_TYPES)
        _one_of(cfg, kind, "final_sigmas_type", FINAL_SIGMAS_TYPES)
        for key in ("predict_x0", "lower_order_final", "use_karras_sigmas"):
            _flag(cfg, kind, key)
        if cfg["solver_p"] is not None:
            raise _refuse(kind, "solver_p", cfg["solver_p"], "None (an external predictor scheduler is not "
                                                               "implemented)")
        dc = cfg["disable_corrector"]
        if not isinstance(dc, (list, tuple)) or not all(isinstance(j, int) and not isinstance(j, bool) for j in dc):
            raise _refuse(kind, "disable_corrector", dc, "a list of step indices")
    if kind == "lcm":
        _positive(cfg, kind, "original_inference_steps", integer=True)
        if cfg["original_inference_steps"] > cfg["num_train_timesteps"]:
            raise _refuse(kind, "original_inference_steps", cfg["original_inference_steps"],
                          f"at most num_train_timesteps={cfg['num_train_timesteps']}")
        _positive(cfg, kind, "timestep_scaling")


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
