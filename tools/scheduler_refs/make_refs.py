"""Reference tables of diffusers 0.29.2 DDIM / UniPC / LCM schedulers for tests/test_scheduler_config.py.

Run in a separate environment that has PyTorch and diffusers 0.29.2 (never needed by the tests or CI):

    python -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 diffusers==0.29.2
    .venv-ref/bin/python tools/scheduler_refs/make_refs.py            # writes tests/data/scheduler_refs.json

For every case (scheduler class, config = the SD1.5 scheduler file + overrides, number of steps) it records the
resolved config, the timesteps, sigmas (UniPC), a digest of alphas_cumprod, the add_noise multipliers the official
ANS would use, and every step's output for fixed model outputs and noise. The model outputs and noise come from
`pseudo()` (a closed formula, restated in the test), so nothing large is stored.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch
import diffusers
from diffusers import DDIMScheduler, LCMScheduler, UniPCMultistepScheduler
from diffusers.schedulers import scheduling_lcm

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLASSES = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler}

# The Stable Diffusion 1.5 scheduler file (PNDM) that test_pasd.py loads, and the zero-terminal-SNR variant the
# colorization golden uses.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
GRAY = {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
SHAPE = (2, 2, 2, 2)
LEVELS = (900, 899, 500, 400)
TRAINED_BETAS_100 = [round(1e-4 + 0.03 * (i / 99) ** 1.5, 8) for i in range(100)]

CASES = [
    # DDIM
    ("ddim_sd15_10", "ddim", SD15, {}, 10, 0.0),
    ("ddim_linspace_7", "ddim", SD15, {"timestep_spacing": "linspace"}, 7, 0.0),
    ("ddim_zsnr_trailing_v_6", "ddim", GRAY, {"prediction_type": "v_prediction"}, 6, 0.0),
    ("ddim_clip_sample_pred_5", "ddim", SD15, {"clip_sample": True, "clip_sample_range": 0.5,
                                               "prediction_type": "sample"}, 5, 0.0),
    ("ddim_linear_alpha1_eta_8", "ddim", SD15, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                                                "set_alpha_to_one": True, "steps_offset": 0}, 8, 0.7),
    ("ddim_cos_threshold_v_5", "ddim", SD15, {"beta_schedule": "squaredcos_cap_v2", "thresholding": True,
                                              "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5,
                                              "prediction_type": "v_prediction"}, 5, 0.0),
    ("ddim_trained_betas_4", "ddim", SD15, {"trained_betas": TRAINED_BETAS_100, "num_train_timesteps": 100}, 4, 0.0),
    ("ddim_zsnr_trailing_eps_4", "ddim", GRAY, {}, 4, 0.0),
    # UniPC
    ("unipc_sd15_20", "unipc", SD15, {}, 20, 0.0),
    ("unipc_gray_4", "unipc", GRAY, {}, 4, 0.0),
    ("unipc_gray_v_5", "unipc", GRAY, {"prediction_type": "v_prediction"}, 5, 0.0),
    ("unipc_leading_order3_6", "unipc", SD15, {"timestep_spacing": "leading", "solver_order": 3}, 6, 0.0),
    ("unipc_karras_10", "unipc", SD15, {"use_karras_sigmas": True}, 10, 0.0),
    ("unipc_karras_zsnr_sigmamin_8", "unipc", GRAY, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                                     "prediction_type": "v_prediction"}, 8, 0.0),
    ("unipc_bh1_eps_sigmamin_6", "unipc", SD15, {"solver_type": "bh1", "predict_x0": False,
                                                 "final_sigmas_type": "sigma_min"}, 6, 0.0),
    ("unipc_threshold_sample_5", "unipc", SD15, {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                                 "sample_max_value": 2.0, "prediction_type": "sample"}, 5, 0.0),
    ("unipc_nocorr_nolof_6", "unipc", SD15, {"disable_corrector": [0, 2], "lower_order_final": False,
                                             "final_sigmas_type": "sigma_min", "solver_order": 3}, 6, 0.0),
    ("unipc_cos_linear_midpoint_5", "unipc", SD15, {"beta_schedule": "squaredcos_cap_v2", "solver_type": "midpoint",
                                                    "timestep_spacing": "leading", "steps_offset": 3}, 5, 0.0),
    # LCM
    ("lcm_sd15_4", "lcm", SD15, {}, 4, 0.0),
    ("lcm_sd15_1", "lcm", SD15, {}, 1, 0.0),
    ("lcm_sd15_8", "lcm", SD15, {}, 8, 0.0),
    ("lcm_orig30_scale5_6", "lcm", SD15, {"original_inference_steps": 30, "timestep_scaling": 5.0}, 6, 0.0),
    ("lcm_gray_v_4", "lcm", GRAY, {"prediction_type": "v_prediction"}, 4, 0.0),
    ("lcm_clip_sample_pred_3", "lcm", SD15, {"clip_sample": True, "clip_sample_range": 0.8,
                                             "prediction_type": "sample"}, 3, 0.0),
    ("lcm_threshold_5", "lcm", SD15, {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                      "sample_max_value": 3.0}, 5, 0.0),
    ("lcm_linear_1000_6", "lcm", SD15, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                                        "original_inference_steps": 100}, 6, 0.0),
    ("lcm_gray_eps_4", "lcm", GRAY, {}, 4, 0.0),
]


def pseudo(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic test tensor from a closed formula (restated in the test)."""
    k = np.arange(int(np.prod(shape)), dtype=np.float64)
    v = np.sin(k * 0.7071 + 0.31 * seed) + 0.5 * np.cos(k * 1.3 + 1.7 * seed)
    return (1.5 * v).astype(np.float32).reshape(shape)


def f32s(x) -> str:
    """float32 values as one line of their shortest round-trip strings."""
    return " ".join(str(np.float32(v)) for v in np.asarray(x, dtype=np.float32).ravel())


def clean(cfg) -> dict:
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def add_noise_coefficients(s, t: int) -> list[str]:
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    ts = torch.tensor([t], dtype=torch.long)
    return f32s([s.add_noise(ones, zeros, ts).item(), s.add_noise(zeros, ones, ts).item()])


def run_case(name, kind, base, overrides, n, eta) -> dict:
    cls = CLASSES[kind]
    raw = {**base, **overrides}
    s = cls.from_config(raw)
    s.set_timesteps(n)
    rec = {"kind": kind, "raw_config": raw, "steps": n, "eta": eta, "config": clean(s.config),
           "timesteps": [int(t) for t in s.timesteps], "alphas_cumprod_digest": digest(s.alphas_cumprod)}
    if kind == "unipc":
        rec["sigmas"] = f32s(s.sigmas)
    t0 = int(s.timesteps[0])
    big_t = int(s.config.num_train_timesteps)
    rec["add_noise"] = {str(t): add_noise_coefficients(s, t) for t in (t0,) + LEVELS if t < big_t}
    sample = torch.from_numpy(pseudo(SHAPE, 0))
    outs, denoised, noises = [], [], []
    for i, t in enumerate(s.timesteps):
        eps = torch.from_numpy(pseudo(SHAPE, 100 + i))
        noise = torch.from_numpy(pseudo(SHAPE, 200 + i))
        if kind == "ddim":
            out = s.step(eps, t, sample, eta=eta, variance_noise=noise if eta > 0 else None, return_dict=False)
        elif kind == "lcm":
            used = []
            scheduling_lcm.randn_tensor = lambda *a, _n=noise, _u=used, **k: (_u.append(1), _n.clone())[1]
            out = s.step(eps, t, sample, return_dict=False)
            noises.append(len(used))
            denoised.append(f32s(out[1]))
        else:
            out = s.step(eps, t, sample, return_dict=False)
        sample = out[0]
        outs.append(f32s(sample))
    rec["step_outputs"] = outs
    rec["all_finite"] = bool(all(np.isfinite(np.asarray(o.split(), dtype=np.float32)).all() for o in outs))
    if kind == "lcm":
        rec["denoised"] = denoised
        rec["noise_draws_per_step"] = noises
        c = [s.get_scalings_for_boundary_condition_discrete(t) for t in s.timesteps]
        rec["c_skip"] = f32s([float(a) for a, _ in c])
        rec["c_out"] = f32s([float(b) for _, b in c])
    return rec


def digest(abar) -> dict:
    a = np.asarray(abar, dtype=np.float32)
    idx = sorted({0, 1, 2, 10, 50, 100, 250, 400, 500, 750, 899, 900, 998, 999} & set(range(len(a)))
                 | {len(a) - 1, len(a) - 2})
    return {"index": idx, "values": f32s(a[idx]), "sum_f64": float(a.astype(np.float64).sum())}


def resolutions() -> dict:
    """What from_config makes of the raw SD1.5 / gray files and of a saved UniPC config, per class."""
    out = {}
    for src_name, src in (("sd15", SD15), ("gray", GRAY)):
        saved_unipc = dict(UniPCMultistepScheduler.from_config(src).config)
        for kind, cls in CLASSES.items():
            out[f"{src_name}->{kind}"] = {"input": src, "config": clean(cls.from_config(src).config)}
            out[f"{src_name}->unipc->{kind}"] = {"input": json.loads(json.dumps(saved_unipc)),
                                                  "config": clean(cls.from_config(saved_unipc).config)}
    return out


def fp16_official_add_noise() -> dict:
    """The official fp16 failure: UniPC's add_noise squares sigma = 4096 in half precision."""
    s = UniPCMultistepScheduler.from_config(GRAY)
    s.set_timesteps(4)
    ones, zeros = torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.float16)
    ts = torch.tensor([999])
    return {"signal": float(s.add_noise(ones, zeros, ts).item()), "noise": float(s.add_noise(zeros, ones, ts).item())}


def dump(refs: dict) -> str:
    """JSON with one line per case / resolution (small, and diffs stay readable)."""
    lines = []
    for key, value in refs.items():
        if isinstance(value, dict) and key in ("cases", "resolutions"):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "scheduler_refs.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    refs = {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "shape": list(SHAPE), "pseudo_check": float(pseudo(SHAPE, 0).astype(np.float64).sum()),
            "cases": {name: run_case(name, *rest) for name, *rest in CASES},
            "resolutions": resolutions(), "fp16_official_unipc_add_noise_999": fp16_official_add_noise()}
    pathlib.Path(args.out).write_text(dump(refs))
    print(f"wrote {args.out}: {len(refs['cases'])} cases")


if __name__ == "__main__":
    main()
