"""Personalized models at the Flax level (issue 6, items 2 and 3): base swap that keeps PACA, LoRA merge."""
from __future__ import annotations

import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from pasd_jax.convert.base import abstract_of, load_model_folder
from pasd_jax.convert.blend import is_paca_key
from pasd_jax.convert.cache import ConversionCache
from pasd_jax.convert.folders import build_module
from pasd_jax.convert.io import load_safetensors, read_json
from pasd_jax.convert.lora import LoraError
from pasd_jax.convert.naming import torch_key
from pasd_jax.convert.personalize import (DIFFUSERS_FOLDER, LORA, SINGLE_FILE, UNET_FILE, UNET_FOLDER, apply_lora,
                                          personalize, source_kind, swap_base)
from pasd_jax.convert.tree import CheckpointMismatchError, flax_to_torch
from pasd_jax.models.blocks import PASD

# Base blend alpha * new + (1 - alpha) * current in float32 vs the float64 formula: measured 2.6e-7 (|w| <= 3.3,
# ~1-2 float32 ulps), so 1e-6 is ~4x.
TOL = 1e-6
# LoRA merges at the Flax level vs the official float32 merges: measured 0 (bit-equal) for all three goldens. The
# merged weights are |w| <= 0.63 (ulp 6e-8) and a float32 merge is ~3e-8 from its float64 formula (the fused-LoRA
# measurement of golden/tiny_pipeline_lcm); 2.5e-7 (~4 ulps) leaves room for another summation order of up @ down.
# Was TOL (1e-6).
LORA_TOL = 2.5e-7


@pytest.fixture(scope="module")
def ldm_dir(golden_dir):
    return golden_dir / "ldm_single_file"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ConversionCache(tmp_path_factory.mktemp("cache"))


def _random_tree(module, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return unflatten_dict({p: rng.standard_normal(l.shape).astype(np.float32)
                           for p, l in flatten_dict(abstract_of(module)).items()})


@pytest.fixture(scope="module")
def pasd_unet(ldm_dir):
    """A PASD UNet of the golden tiny SD layout, all random (PACA included): what a trained run looks like."""
    module = build_module("unet", read_json(ldm_dir / "unet" / "config.json"), variant=PASD)
    return module, _random_tree(module, 0)


@pytest.fixture(scope="module")
def swapped(ldm_dir, pasd_unet, cache):
    return swap_base(ldm_dir / "model.safetensors", unet=pasd_unet, cache=cache)


@pytest.fixture(scope="module")
def golden_unet(ldm_dir):
    return load_safetensors(ldm_dir / "unet" / "diffusion_pytorch_model.safetensors")


def _paca_paths(params) -> list:
    return [p for p in flatten_dict(params) if is_paca_key(torch_key(p))]


def test_single_file_swap_replaces_sd_keys_bitwise_and_keeps_paca(swapped, pasd_unet, golden_unet):
    got = flax_to_torch(swapped.unet)
    sd = [k for k in got if not is_paca_key(k)]
    assert sorted(sd) == sorted(golden_unet) and len(sd) == 496
    same = sum(got[k].tobytes() == golden_unet[k].tobytes() and got[k].dtype == golden_unet[k].dtype for k in sd)
    before, after = flatten_dict(pasd_unet[1]), flatten_dict(swapped.unet)
    paca = _paca_paths(pasd_unet[1])
    kept = sum(after[p] is before[p] for p in paca)
    print(f"swap: {same}/496 SD tensors bit-equal to ldm_single_file/unet, {kept}/{len(paca)} PACA tensors kept; "
          f"{swapped.report.summary()}")
    assert same == 496 and len(paca) == 234 and kept == 234
    assert len(swapped.report.replaced["unet"]) == 496 and len(swapped.report.kept) == 234
    assert swapped.vae is None and swapped.text_encoder is None


@pytest.mark.parametrize("where,kind", [("", DIFFUSERS_FOLDER), ("unet", UNET_FOLDER),
                                        ("unet/diffusion_pytorch_model.safetensors", UNET_FILE)])
def test_folder_sources_give_the_same_tree(ldm_dir, pasd_unet, swapped, cache, where, kind):
    src = ldm_dir / where if where else ldm_dir
    assert source_kind(src) == kind
    got = swap_base(src, unet=pasd_unet, cache=cache)
    a, b = flatten_dict(got.unet), flatten_dict(swapped.unet)
    assert all(np.asarray(a[p]).tobytes() == np.asarray(b[p]).tobytes() for p in b)
    assert got.report.source_kind == kind


def test_vae_and_text_encoder_are_replaced_when_given(ldm_dir, pasd_unet, cache):
    vae = build_module("vae", read_json(ldm_dir / "vae" / "config.json"))
    te = build_module("text_encoder", read_json(ldm_dir / "text_encoder" / "config.json"))
    for src in (ldm_dir / "model.safetensors", ldm_dir):
        got = swap_base(src, unet=pasd_unet, vae=(vae, _random_tree(vae, 1)), text_encoder=(te, _random_tree(te, 2)),
                        alpha=0.5, cache=cache)
        for comp, style, rel, n in (("vae", "diffusers", "vae/diffusion_pytorch_model.safetensors", 248),
                                    ("text_encoder", "transformers", "text_encoder/model.safetensors", 36)):
            ref = load_safetensors(ldm_dir / rel)
            out = flax_to_torch(getattr(got, comp), style=style)
            assert set(out) == set(ref) and all(out[k].tobytes() == ref[k].tobytes() for k in ref), (src, comp)
            assert len(got.report.replaced[comp]) == n
        print(got.report.summary())


def test_partial_blend(ldm_dir, pasd_unet, golden_unet, cache):
    alpha = 0.3
    got = swap_base(ldm_dir / "model.safetensors", unet=pasd_unet, alpha=alpha, cache=cache)
    cur = flax_to_torch(pasd_unet[1])
    out = flax_to_torch(got.unet)
    err = max(float(np.abs(out[k].astype(np.float64) - (alpha * golden_unet[k].astype(np.float64)
                                                        + (1 - alpha) * cur[k].astype(np.float64))).max())
              for k in golden_unet)
    scale = max(float(np.abs(out[k]).max()) for k in golden_unet)
    print(f"alpha={alpha}: max abs err vs alpha*new + (1-alpha)*current (float64): {err:.3g} (max |w| {scale:.2f})")
    assert err <= TOL
    assert all(out[k].tobytes() == cur[k].tobytes() for k in out if is_paca_key(k))
    unchanged = swap_base(ldm_dir / "model.safetensors", unet=pasd_unet, alpha=0.0, cache=cache)
    assert unchanged.report.replaced["unet"] == ()
    a, b = flatten_dict(unchanged.unet), flatten_dict(pasd_unet[1])
    assert all(a[p] is b[p] for p in b)


def test_swap_with_another_architecture_fails_and_changes_nothing(golden_dir, pasd_unet):
    with pytest.raises(CheckpointMismatchError, match="shape mismatches") as e:
        swap_base(golden_dir / "tiny_pasd" / "unet", unet=pasd_unet, cache=False)
    print(str(e.value)[:400])


def test_a_lora_is_not_a_base(golden_dir, pasd_unet):
    with pytest.raises(Exception, match="LoRA"):
        swap_base(golden_dir / "lora" / "lora_kohya.safetensors", unet=pasd_unet, cache=False)


@pytest.fixture(scope="module")
def text_encoder(ldm_dir, cache):
    return load_model_folder(ldm_dir / "text_encoder", cache=cache)


@pytest.mark.parametrize("lora_file,rule,golden", [
    ("lora_kohya", "official", "merged_pasd_official_mult0.6"),
    ("lora_kohya", "alpha_scaled", "merged_alpha_scaled_mult0.6"),
    ("lora_kohya_conv3x3", "alpha_scaled", "merged_alpha_scaled_conv3x3_mult0.6"),
])
def test_lora_at_flax_level_matches_golden(golden_dir, pasd_unet, swapped, text_encoder, lora_file, rule, golden):
    """The PASD UNet (SD keys = the golden base, PACA random) and the CLIP encoder, merged as Flax params."""
    unet = (pasd_unet[0], swapped.unet)
    got = apply_lora(golden_dir / "lora" / f"{lora_file}.safetensors", unet=unet, text_encoder=text_encoder,
                     multiplier=0.6, rule=rule)
    ref = load_safetensors(golden_dir / "lora" / f"{golden}.safetensors")
    out = {"unet": flax_to_torch(got.unet), "text_encoder": flax_to_torch(got.text_encoder, style="transformers")}
    changed = sorted(f"{c}.{k}" for c, keys in got.report.replaced.items() for k in keys)
    assert changed == sorted(ref)
    errs = {k: float(np.abs(out[k.split(".", 1)[0]][k.split(".", 1)[1]] - v).max()) for k, v in ref.items()}
    print(f"{golden} at the Flax level: {len(ref)} tensors, max abs err {max(errs.values()):.3g}")
    assert max(errs.values()) <= LORA_TOL
    before, after = flatten_dict(swapped.unet), flatten_dict(got.unet)
    merged_unet = {k.split(".", 1)[1] for k in ref if k.startswith("unet.")}
    untouched = [p for p in before if torch_key(p) not in merged_unet]
    assert len(untouched) == len(before) - len(merged_unet)
    assert all(after[p] is before[p] for p in untouched)  # only the targeted tensors were converted and replaced


def test_official_rule_refuses_3x3_conv_lora(golden_dir, pasd_unet, swapped):
    with pytest.raises(LoraError, match=r"3x3 conv LoRA .*rule='official'") as e:
        apply_lora(golden_dir / "lora" / "lora_kohya_conv3x3.safetensors", unet=(pasd_unet[0], swapped.unet),
                   multiplier=0.6, rule="official")
    print(e.value)


def test_lora_without_text_encoder_reports_skipped(golden_dir, pasd_unet, swapped):
    got = apply_lora(golden_dir / "lora" / "lora_kohya.safetensors", unet=(pasd_unet[0], swapped.unet))
    assert got.text_encoder is None and len(got.report.replaced["unet"]) == 13
    assert len(got.report.ignored) == 12 and all(n.startswith("lora_te_") for n in got.report.ignored)


def test_personalize_dispatches(golden_dir, ldm_dir, pasd_unet, swapped, text_encoder, cache):
    lora = golden_dir / "lora" / "lora_kohya.safetensors"
    assert source_kind(lora) == LORA and source_kind(ldm_dir / "model.safetensors") == SINGLE_FILE
    merged = personalize(lora, unet=(pasd_unet[0], swapped.unet), text_encoder=text_encoder, multiplier=0.6)
    assert merged.report.source_kind == LORA and merged.report.rule == "alpha_scaled"
    swap = personalize(ldm_dir / "model.safetensors", unet=pasd_unet, cache=cache)
    assert swap.report.source_kind == SINGLE_FILE and len(swap.report.replaced["unet"]) == 496


def test_pasd_light_keeps_its_added_keys(ldm_dir, golden_unet, cache):
    module = build_module("unet", read_json(ldm_dir / "unet" / "config.json"), variant="pasd_light")
    params = _random_tree(module, 3)
    got = swap_base(ldm_dir / "model.safetensors", unet=(module, params), cache=cache)
    out = flax_to_torch(got.unet)
    light = sorted(k for k in out if is_paca_key(k))
    before, after = flatten_dict(params), flatten_dict(got.unet)
    print(f"pasd_light: {len(got.report.replaced['unet'])} SD tensors replaced, {len(light)} added tensors kept")
    assert light and all(any(m in k for m in ("attn2_plus", "norm2_plus", "proj_in_plus")) for k in light)
    assert all(out[k].tobytes() == golden_unet[k].tobytes() for k in golden_unet)
    assert all(after[p] is before[p] for p in _paca_paths(params))
