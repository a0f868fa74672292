"""Personalized-model blending into a PASD UNet dict (issue 6, item 2): SD base keys swapped, PACA kept."""
from __future__ import annotations

import numpy as np
import pytest

from pasd_jax.convert.blend import BlendError, blend_weights, is_paca_key
from pasd_jax.convert.io import load_safetensors
from pasd_jax.convert.ldm import load_single_file


@pytest.fixture(scope="module")
def personalized(golden_dir):
    d = golden_dir / "ldm_single_file"
    return load_single_file(d / "model.safetensors", base=d).unet, load_safetensors(
        d / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def pasd_unet(personalized):
    """A PASD-like UNet dict: other SD base values plus PACA / pasd_light tensors that must survive the swap."""
    sd, _ = personalized
    rng = np.random.default_rng(0)
    cur = {k: (v + 1.0).astype(v.dtype) for k, v in sd.items()}
    for b in (1, 2):
        cur[f"up_blocks.{b}.pixel_attentions.0.proj_in.weight"] = rng.standard_normal((24, 24, 1, 1), np.float32)
        cur[f"up_blocks.{b}.attentions.0.transformer_blocks.0.attn2_plus.to_q.weight"] = rng.standard_normal(
            (24, 24), np.float32)
        cur[f"up_blocks.{b}.attentions.0.transformer_blocks.0.norm2_plus.weight"] = rng.standard_normal(24, np.float32)
        cur[f"up_blocks.{b}.attentions.0.proj_in_plus.weight"] = rng.standard_normal((24, 24, 1, 1), np.float32)
    return cur


def test_full_swap_is_bitwise_and_keeps_paca(personalized, pasd_unet):
    new, ref = personalized
    out, replaced = blend_weights(pasd_unet, new, alpha=1.0)
    paca = [k for k in pasd_unet if is_paca_key(k)]
    assert len(replaced) == len(ref) == 496 and len(paca) == 8
    assert all(out[k].tobytes() == ref[k].tobytes() and out[k].dtype == ref[k].dtype for k in ref)
    assert all(out[k] is pasd_unet[k] for k in paca)
    print(f"alpha=1: {len(replaced)} SD tensors bit-equal to the personalized UNet, {len(paca)} PACA tensors kept")


def test_partial_blend_formula(personalized, pasd_unet):
    new, _ = personalized
    out, replaced = blend_weights(pasd_unet, new, alpha=0.3)
    ref = {k: 0.3 * new[k].astype(np.float64) + 0.7 * pasd_unet[k].astype(np.float64) for k in replaced}
    err = max(float(np.abs(out[k] - ref[k]).max()) for k in replaced)
    scale = max(float(np.abs(r).max()) for r in ref.values())
    print(f"alpha=0.3: max abs err vs 0.3*new + 0.7*current in float64: {err:.3g} (max |w| {scale:.2f})")
    # float32 blend vs the float64 formula: measured 8.9e-8 (under half an ulp of |w| <= 2.06: rounded once);
    # 1e-6 is ~4 float32 ulps of the largest |w|
    assert err <= 1e-6
    assert blend_weights(pasd_unet, new, alpha=0.0)[1] == []


def test_paca_keys_in_new_are_never_blended(pasd_unet):
    k = "up_blocks.1.pixel_attentions.0.proj_in.weight"
    out, replaced = blend_weights(pasd_unet, {k: np.zeros((24, 24, 1, 1), np.float32)})
    assert replaced == [] and out[k] is pasd_unet[k]


def test_other_architecture_is_refused(golden_dir, personalized):
    new, _ = personalized
    other = load_safetensors(golden_dir / "tiny_pasd" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(BlendError, match="shape mismatch") as e:
        blend_weights(other, new)
    print(str(e.value)[:300])
    with pytest.raises(BlendError, match="does not have: extra.weight"):
        blend_weights(new, {"extra.weight": np.zeros(1, np.float32)})
