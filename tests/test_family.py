"""Model-family detection (issue 6, item 6): SDXL / SD2 / inpainting / non-UNet weights are refused clearly."""
from __future__ import annotations

import numpy as np
import pytest

from pasd_jax.convert.family import ModelFamilyError, check_sd1, detect_family
from pasd_jax.convert.io import load_safetensors

U = "model.diffusion_model."
ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def s(*shape):
    return np.broadcast_to(np.float32(0), shape)  # only shapes matter here


def ldm_sd1(cross=768, cin=4, width=768) -> dict:
    return {U + "input_blocks.0.0.weight": s(320, cin, 3, 3), U + ATTN2_K: s(320, cross),
            U + "out.2.weight": s(4, 320, 3, 3), "first_stage_model.encoder.conv_in.weight": s(128, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": s(49408, width)}


def test_sd1_is_accepted(golden_dir):
    d = golden_dir / "ldm_single_file"
    assert check_sd1(ldm_sd1()).layout == "ldm"
    assert check_sd1(load_safetensors(d / "model.safetensors")).is_sd1  # tiny: cross dim 32 = text width 32
    assert check_sd1(load_safetensors(d / "unet" / "diffusion_pytorch_model.safetensors")).layout == "diffusers_unet"
    assert check_sd1(load_safetensors(golden_dir / "lora" / "lora_kohya.safetensors")).layout == "kohya_lora"


def _refused(state, *patterns, metadata=None):
    with pytest.raises(ModelFamilyError) as e:
        check_sd1(state, what="model.safetensors", metadata=metadata)
    msg = str(e.value)
    print(msg)
    assert msg.startswith("model.safetensors: this looks like")
    assert "expected" in msg and "Stable Diffusion 1.x" in msg
    for p in patterns:
        assert p in msg, p
    return msg


def test_sdxl_single_file():
    state = {U + "input_blocks.0.0.weight": s(320, 4, 3, 3), U + "label_emb.0.0.weight": s(1280, 2816),
             U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": s(640, 2048),
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": s(49408, 768),
             "conditioner.embedders.1.model.ln_final.weight": s(1280)}
    _refused(state, "SDXL", "conditioner.embedders", "cross-attention dim 2048")
    assert detect_family(state).name == "sdxl"


def test_sdxl_refiner_single_file():
    state = {U + "input_blocks.0.0.weight": s(384, 4, 3, 3), U + "label_emb.0.0.weight": s(1536, 2560),
             "conditioner.embedders.0.model.ln_final.weight": s(1280)}
    _refused(state, "SDXL refiner")


def test_sd2_single_file_says_v_cannot_be_told():
    state = {U + "input_blocks.0.0.weight": s(320, 4, 3, 3), U + ATTN2_K: s(320, 1024),
             "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": s(3072, 1024)}
    _refused(state, "Stable Diffusion 2.x", "cond_stage_model.model", "cross-attention dim 1024",
             "768-v", "cannot be told from the weights")


def test_cross_attention_1024_alone_is_sd2():
    _refused(ldm_sd1(cross=1024, width=1024), "Stable Diffusion 2.x", "cross-attention dim 1024", "768-v")


def test_inpainting_single_file():
    _refused(ldm_sd1(cin=9), "inpainting", "[320, 9, 3, 3]", "expected 4 input channels")
    _refused(ldm_sd1(cin=8), "InstructPix2Pix")


def test_text_width_must_match_cross_attention():
    _refused(ldm_sd1(cross=768, width=512), "text width 512", "cross-attention dim 768")


def test_not_a_unet():
    _refused({U + "joint_blocks.0.x_block.attn.qkv.weight": s(4608, 1536)}, "not an SD UNet", "joint_blocks")
    _refused({"first_stage_model.encoder.conv_in.weight": s(128, 3, 3, 3)}, "no UNet", "first_stage_model")
    _refused({"foo.weight": s(3)}, "no known Stable Diffusion key layout", "foo.weight")


def test_diffusers_unet_dicts():
    base = {"conv_in.weight": s(320, 4, 3, 3), "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            s(320, 768)}
    assert check_sd1(base).is_sd1
    _refused({**base, "add_embedding.linear_1.weight": s(1280, 2816)}, "SDXL", "add_embedding")
    _refused({**base, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": s(320, 1024)},
             "Stable Diffusion 2.x", "1024", "768-v")
    _refused({**base, "conv_in.weight": s(320, 9, 3, 3)}, "inpainting", "conv_in.weight")
    _refused({**base, "class_embedding.linear_1.weight": s(1280, 1280)}, "class-conditioned")


def test_lora_families():
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    assert check_sd1({q: s(4, 768)}).is_sd1
    _refused({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": s(4, 1280)}, "SDXL",
             "lora_te2_")
    _refused({q: s(4, 1024)}, "Stable Diffusion 2.x", "OpenCLIP")
    _refused({q: s(4, 768)}, "ss_v2='True'", metadata={"ss_v2": "True", "ss_base_model_version": "sd_v2"})
