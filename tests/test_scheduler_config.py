"""Scheduler configs honoured key by key, against diffusers 0.29.2's own DDIM / UniPC / LCM schedulers.

The reference numbers are in tests/data/scheduler_refs.json, written by tools/scheduler_refs/make_refs.py in a
separate PyTorch + diffusers 0.29.2 environment (no torch here). Model outputs and noise come from the closed
formula `pseudo`, restated from that script.
"""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.schedulers import (SchedulerConfigError, ans_coefficients, effective_config, ignored_keys,
                                 scheduler_from_config)
from pasd_jax.schedulers.config import DEFAULTS

REFS = json.loads((pathlib.Path(__file__).parent / "data" / "scheduler_refs.json").read_text())
SHAPE = tuple(REFS["shape"])


def pseudo(shape, seed):
    k = np.arange(int(np.prod(shape)), dtype=np.float64)
    v = np.sin(k * 0.7071 + 0.31 * seed) + 0.5 * np.cos(k * 1.3 + 1.7 * seed)
    return (1.5 * v).astype(np.float32).reshape(shape)


def f32(text):
    return np.asarray(text.split(), dtype=np.float32)


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def test_pseudo_formula_matches_the_generator():
    assert float(pseudo(SHAPE, 0).astype(np.float64).sum()) == REFS["pseudo_check"]


@pytest.mark.parametrize("name", sorted(REFS["resolutions"]))
def test_config_resolution_matches_from_config(name):
    """SD1.5 / zero-SNR files and a saved UniPC config (with `_use_default_values`), resolved per class."""
    ref = REFS["resolutions"][name]
    kind = name.split("->")[-1]
    ours = effective_config(ref["input"], kind)
    theirs = {k: v for k, v in ref["config"].items() if k in DEFAULTS[kind]}
    assert set(theirs) == set(ours)
    for key in ours:
        assert _norm(ours[key]) == theirs[key], (name, key, ours[key], theirs[key])


def test_saved_unipc_config_drops_its_defaults_for_other_classes():
    """A saved UniPC config lists timestep_spacing among `_use_default_values`: as DDIM it must be DDIM's own
    default "leading", not UniPC's "linspace" (what a plain key merge would silently take)."""
    saved = REFS["resolutions"]["sd15->unipc->ddim"]["input"]
    assert saved["timestep_spacing"] == "linspace" and "timestep_spacing" in saved["_use_default_values"]
    assert effective_config(saved, "ddim")["timestep_spacing"] == "leading"
    assert effective_config(saved, "lcm")["prediction_type"] == "epsilon"


def test_ignored_keys_are_the_ones_diffusers_ignores():
    sd15 = REFS["cases"]["ddim_sd15_10"]["raw_config"]
    assert ignored_keys(sd15, "ddim") == ["_class_name", "_diffusers_version", "skip_prk_steps"]
    assert ignored_keys(sd15, "unipc") == ["_class_name", "_diffusers_version", "clip_sample", "set_alpha_to_one",
                                           "skip_prk_steps"]
    assert ignored_keys(sd15, "lcm") == ["_class_name", "_diffusers_version", "skip_prk_steps"]
    # and they change nothing: the SD1.5 file builds the same scheduler as its class keys alone
    only = {k: v for k, v in sd15.items() if k not in ignored_keys(sd15, "unipc")}
    a, b = scheduler_from_config(sd15, "unipc", 6), scheduler_from_config(only, "unipc", 6)
    np.testing.assert_array_equal(a.sigmas, b.sigmas)


def _build(ref):
    return scheduler_from_config(ref["raw_config"], ref["kind"], ref["steps"],
                                 **({"eta": ref["eta"]} if ref["kind"] == "ddim" else {}))


FINITE = sorted(n for n, c in REFS["cases"].items() if c["all_finite"])
NAN_IN_DIFFUSERS = sorted(n for n, c in REFS["cases"].items() if not c["all_finite"])


@pytest.mark.parametrize("name", NAN_IN_DIFFUSERS)
def test_configs_where_diffusers_gives_nan_are_refused(name):
    """Zero terminal SNR + epsilon prediction at t=999 (DDIM trailing, LCM): diffusers divides by sqrt(abar)=0."""
    with pytest.raises(SchedulerConfigError, match="prediction_type='epsilon'.*rescale_betas_zero_snr"):
        _build(REFS["cases"][name])


@pytest.mark.parametrize("name", FINITE)
def test_schedule_tables_match_diffusers(name):
    ref = REFS["cases"][name]
    s = _build(ref)
    assert s.timesteps.tolist() == ref["timesteps"]
    dig = ref["alphas_cumprod_digest"]
    abar_err = float(np.abs(s.alphas_cumprod[dig["index"]] - f32(dig["values"])).max())
    sum_err = abs(float(s.alphas_cumprod.astype(np.float64).sum()) - dig["sum_f64"])
    sig_err = float(np.abs(s.sigmas - f32(ref["sigmas"])).max() / f32(ref["sigmas"]).max()) if "sigmas" in ref else 0.0
    print(f"{name}: alphas_cumprod max abs err {abar_err:.3g}, sum err {sum_err:.3g}, sigmas max rel err {sig_err:.3g}")
    if ref["config"]["rescale_betas_zero_snr"]:
        # torch's float32 Tensor.sqrt in the zero-SNR rescale is not correctly rounded on the reference build (MKL;
        # 182 of 1000 values 1 ulp off): measured <= 1.8e-7 in alphas_cumprod, 2.5e-5 in its sum, 6e-8 in sigmas.
        assert abar_err <= 4e-7 and sum_err <= 5e-5 and sig_err <= 2.4e-7
    else:
        # The same float32 operations (torch's fused linspace, float64-accumulated cumprod): bit-identical; Karras
        # sigmas are float64 in diffusers, cast once: measured <= 7.3e-8 relative.
        assert abar_err == 0.0 and sum_err <= 1e-12 and sig_err <= 1.2e-7
    if ref["kind"] == "lcm":
        c_err = max(float(np.abs(s.c_skip / f32(ref["c_skip"]) - 1).max()),
                    float(np.abs(s.c_out - f32(ref["c_out"])).max()))
        print(f"{name}: c_skip / c_out max rel err {c_err:.3g}")
        # torch's float32 sqrt is not correctly rounded near ties (c_out at t=164, scaling 5: 820/sqrt(672400.25)
        # rounds 1 ulp the other way): measured <= 1.2e-7, one ulp of c_out ~ 1.
        assert c_err <= 1.2e-7
        assert s.step_noise_used.astype(int).tolist() == ref["noise_draws_per_step"]


@pytest.mark.parametrize("name", FINITE)
def test_official_add_noise_matches_diffusers(name):
    """The multipliers of diffusers' add_noise after set_timesteps (what the official ANS calls), per level."""
    ref = REFS["cases"][name]
    s = _build(ref)
    worst = 0.0
    for level, coeffs in ref["add_noise"].items():
        ours = np.asarray(s.official_add_noise_coefficients(int(level)), np.float32)
        worst = max(worst, float(np.abs(ours - f32(coeffs)).max()))
        if int(level) != ref["timesteps"][0]:
            assert ans_coefficients(s, int(level), "official").second == tuple(s.official_add_noise_coefficients(
                int(level)))
    print(f"{name}: add_noise multipliers max abs err {worst:.3g}")
    # Host float32 formulas as torch's, up to torch's sqrt rounding: measured <= 1.2e-7 (2 ulp of numbers <= 1),
    # 1.8e-7 with the zero-SNR rescale (alphas_cumprod itself 1 ulp off there, see above).
    assert worst <= (2.4e-7 if ref["config"]["rescale_betas_zero_snr"] else 1.2e-7)


def _step_errors(s, ref):
    """Per-step max abs error and worst error relative to max(1, |x|) against the reference chain (LCM: and its
    `denoised`), for fixed model outputs and noise, chained from the same start."""
    carry = s.init_carry(jnp.asarray(pseudo(SHAPE, 0)))
    errs, rel = [], []
    for i in range(min(s.num_inference_steps, len(ref["step_outputs"]))):
        eps = jnp.asarray(pseudo(SHAPE, 100 + i))
        noise = jnp.asarray(pseudo(SHAPE, 200 + i))
        out, carry = s.step(carry, i, eps, noise) if s.needs_step_noise else s.step(carry, i, eps)
        want = f32(ref["step_outputs"][i]).reshape(SHAPE)
        errs.append(float(np.abs(np.asarray(out) - want).max()))
        rel.append(errs[-1] / max(1.0, float(np.abs(want).max())))
        if ref["kind"] == "lcm":
            den = np.abs(np.asarray(carry.denoised) - f32(ref["denoised"][i]).reshape(SHAPE)).max()
            rel[-1] = max(rel[-1], float(den) / max(1.0, float(np.abs(f32(ref["denoised"][i])).max())))
    return errs, max(rel)


@pytest.mark.parametrize("name", FINITE)
def test_steps_match_diffusers(name):
    """Every step's output, for fixed model outputs and noise."""
    errs, worst = _step_errors(_build(REFS["cases"][name]), REFS["cases"][name])
    print(f"{name}: per-step max abs err {[f'{e:.2g}' for e in errs]}, worst rel {worst:.3g}")
    # float32 with another operation order (precomputed tables, XLA): measured <= 8.9e-7 relative to max(1, |x|)
    # (UniPC at sigma 4096 included); a key handled wrongly gives >= 1e-3 (test_a_wrong_key_is_detected).
    assert worst <= 5e-6


@pytest.mark.parametrize("name,wrong", [
    ("ddim_linspace_7", {"timestep_spacing": "leading"}),
    ("ddim_sd15_10", {"set_alpha_to_one": True}),
    ("ddim_clip_sample_pred_5", {"clip_sample": False}),
    ("ddim_cos_threshold_v_5", {"thresholding": False}),
    ("ddim_zsnr_trailing_v_6", {"rescale_betas_zero_snr": False}),
    ("unipc_karras_10", {"use_karras_sigmas": False}),
    ("unipc_threshold_sample_5", {"thresholding": False}),
    ("unipc_leading_order3_6", {"solver_order": 2}),
    ("unipc_nocorr_nolof_6", {"disable_corrector": []}),
    ("unipc_bh1_eps_sigmamin_6", {"solver_type": "bh2"}),
    ("unipc_gray_v_5", {"prediction_type": "epsilon"}),
    ("unipc_cos_linear_midpoint_5", {"steps_offset": 0}),
    ("lcm_threshold_5", {"thresholding": False}),
    ("lcm_orig30_scale5_6", {"original_inference_steps": 50}),
    ("lcm_clip_sample_pred_3", {"prediction_type": "epsilon"}),
])
def test_a_wrong_key_is_detected(name, wrong):
    """The step comparison is sensitive to each key: the same case built with one key changed misses the
    reference by far more than the tolerance above."""
    ref = REFS["cases"][name]
    s = scheduler_from_config(ref["raw_config"], ref["kind"], ref["steps"], **wrong,
                              **({"eta": ref["eta"]} if ref["kind"] == "ddim" else {}))
    _, worst = _step_errors(s, ref)
    print(f"{name} with {wrong}: worst rel err {worst:.3g}")
    assert worst > 1e-3


REFUSED = [
    ("ddim", "timestep_spacing", "karras"),
    ("unipc", "timestep_spacing", "uniform"),
    ("ddim", "prediction_type", "flow"),
    ("lcm", "prediction_type", "x0"),
    ("unipc", "beta_schedule", "sigmoid"),
    ("lcm", "beta_schedule", "exp"),
    ("unipc", "final_sigmas_type", "sigma_max"),
    ("unipc", "solver_type", "dpmsolver"),
    ("unipc", "solver_p", "DDIMScheduler"),
    ("unipc", "solver_order", 0),
    ("unipc", "disable_corrector", "all"),
    ("ddim", "thresholding", "yes"),
    ("lcm", "original_inference_steps", 2000),
    ("lcm", "timestep_scaling", 0),
    ("ddim", "steps_offset", -1),
    ("ddim", "trained_betas", [0.01] * 10),
]


@pytest.mark.parametrize("kind,key,value", REFUSED)
def test_unsupported_values_are_refused_by_name(kind, key, value):
    with pytest.raises(SchedulerConfigError) as info:
        scheduler_from_config(REFS["cases"]["ddim_sd15_10"]["raw_config"], kind, 4, **{key: value})
    msg = str(info.value)
    print(msg)
    assert key in msg and "supported" in msg and "\n" not in msg
    if not isinstance(value, list):
        assert repr(value) in msg


def test_unknown_override_and_eta_for_other_kinds():
    raw = REFS["cases"]["ddim_sd15_10"]["raw_config"]
    with pytest.raises(ValueError, match="unknown lcm scheduler option"):
        scheduler_from_config(raw, "lcm", 4, solver_order=2)
    with pytest.raises(ValueError, match="eta only applies to the ddim scheduler, not lcm"):
        scheduler_from_config(raw, "lcm", 4, eta=0.5)
    with pytest.raises(SchedulerConfigError, match="steps_offset=600"):
        scheduler_from_config(raw, "ddim", 2, steps_offset=600)
