"""LCM-LoRA fusing against the official `test_pasd.py --use_lcm_lora` goldens (issue 15, item 2).

The official path is diffusers 0.29.2 `load_lora_weights(<folder>)` + `fuse_lora()` (lora_scale 1.0) into the PASD
UNet (`tiny_pasd/unet`, PACA present). Two goldens: kohya keys with alpha != rank and several ranks/alphas
(`tiny_pipeline_lcm`), and PEFT keys without alphas, where diffusers 0.29.2 gives every module the first lora_B
key's rank as lora_alpha (`tiny_pipeline_lcm_peft`: 103 of 128 modules fuse at 0.5, not 1). Both touch 128 UNet
modules: attention projections, proj_in/out, ff, resnet convs, shortcuts, down/upsampler convs and time_emb_proj.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from pasd_jax.convert.base import load_model_folder
from pasd_jax.convert.io import load_safetensors
from pasd_jax.convert.lora import lcm_lora_spec, module_scales, read_lora
from pasd_jax.convert.personalize import apply_loras
from pasd_jax.convert.tree import flax_to_torch

VARIANTS = ["tiny_pipeline_lcm", "tiny_pipeline_lcm_peft"]
# The golden README suggests ~1e-6 absolute for fused weights (its float64 formula error is 2e-8, |W| < 0.2);
# this port does the float32 ops peft does (B @ A, one multiply by the float32 scale, one add) and measures 0.
FULL_TOL = 1e-6
# delta_max_abs / rel_change_l2 are float64 statistics of the fused float32 tensors; a few-ulp difference in the
# fused values moves them by < 1e-6 relative, a wrong scale (0.5 vs 1) or a transposed delta by far more. Measured 0.
STAT_RTOL = 1e-5


@pytest.fixture(scope="module")
def pasd_unet(golden_dir):
    return load_model_folder(golden_dir / "tiny_pasd" / "unet", cache=False)


@pytest.fixture(scope="module")
def base_torch(golden_dir):
    return load_safetensors(golden_dir / "tiny_pasd" / "unet" / "diffusion_pytorch_model.safetensors")


def _record(golden_dir, variant):
    return json.loads((golden_dir / variant / "fused_unet_changed_tensors.json").read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_scales_are_the_ones_peft_used(golden_dir, variant):
    rec = _record(golden_dir, variant)["tensors"]
    lora = read_lora(golden_dir / variant / "lcm_lora")
    scales = module_scales(lora, lcm_lora_spec("x").rule)
    by_path = {}
    for m in lora.modules:
        by_path[m.path or m.flat] = scales[m.name]
    got = {k: by_path[k[:-len(".weight")] if variant.endswith("peft") else k[:-len(".weight")].replace(".", "_")]
           for k in rec}
    wrong = {k: (got[k], v["peft_scaling"]) for k, v in rec.items() if got[k] != v["peft_scaling"]}
    halves = sum(1 for v in got.values() if v == 0.5)
    print(f"{variant}: {len(rec)} modules, scales {sorted(set(got.values()))}, {halves} at 0.5, {len(wrong)} differ")
    assert len(lora.modules) == len(rec) == 128 and not wrong
    if variant.endswith("peft"):  # the diffusers 0.29.2 first-key quirk, not alpha = rank
        assert halves == 103


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_unet_matches_official(golden_dir, pasd_unet, base_torch, variant):
    rec = _record(golden_dir, variant)
    gold = load_safetensors(golden_dir / variant / "golden.safetensors")
    got = apply_loras([lcm_lora_spec(golden_dir / variant / "lcm_lora")], unet=pasd_unet, cache=False)
    fused = flax_to_torch(got.unet)
    assert sorted(got.report.replaced["unet"]) == sorted(rec["tensors"])
    assert got.text_encoder is None and not got.report.ignored

    exact, stat_err = 0, 0.0
    for key, info in rec["tensors"].items():
        f = np.ascontiguousarray(fused[key])
        assert f.dtype == np.float32 and list(f.shape) == info["shape"]
        exact += hashlib.sha256(f.tobytes()).hexdigest() == info["sha256_fused"]
        d = f.astype(np.float64) - base_torch[key]
        for ours, theirs in ((np.abs(d).max(), info["delta_max_abs"]),
                             (np.linalg.norm(d) / np.linalg.norm(base_torch[key].astype(np.float64)),
                              info["rel_change_l2"])):
            stat_err = max(stat_err, abs(float(ours) - theirs) / theirs)
    full = {k: float(np.abs(fused[k] - gold["fused." + k]).max()) for k in rec["representative_layers_stored"]}
    assert all(np.array_equal(gold["base." + k], base_torch[k]) for k in full)
    print(f"{variant}: {exact}/{len(rec['tensors'])} fused tensors bit-identical (sha256) to the official fuse; "
          f"max rel err of delta_max_abs / rel_change_l2 {stat_err:.3g}; full tensors max abs err "
          f"{max(full.values()):.3g} ({', '.join(k.rsplit('.', 2)[0] for k in full)})")
    assert stat_err <= STAT_RTOL
    assert max(full.values()) <= FULL_TOL

    # every other tensor (biases, norms, PACA, embeddings) is untouched, and the unchanged leaves are the same objects
    others = [k for k in base_torch if k not in rec["tensors"]]
    assert len(others) == rec["n_unet_tensors"] - rec["n_changed"]
    assert all(np.array_equal(fused[k], base_torch[k]) for k in others)
    before, after = flatten_dict(pasd_unet[1]), flatten_dict(got.unet)
    assert sum(after[p] is before[p] for p in before) == len(before) - rec["n_changed"]
