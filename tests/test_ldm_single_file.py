"""Single-file (original LDM) SD1.x checkpoints -> diffusers-named tensors (issue 6, item 1)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pasd_jax.convert.blend import is_paca_key
from pasd_jax.convert.family import ModelFamilyError
from pasd_jax.convert.io import WeightFileError, load_safetensors, read_json
from pasd_jax.convert.ldm import (LdmConversionError, base_configs, ldm_to_diffusers, load_single_file,
                                  sd15_default_config)

COMPONENT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors",
                   "vae": "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder": "text_encoder/model.safetensors"}


@pytest.fixture(scope="module")
def ldm_dir(golden_dir):
    return golden_dir / "ldm_single_file"


@pytest.fixture(scope="module")
def ldm_state(ldm_dir):
    return load_safetensors(ldm_dir / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_configs(ldm_dir):
    return base_configs(ldm_dir)


def _convert(state, cfg, **over):
    kw = dict(unet_config=cfg["unet"], vae_config=cfg["vae"], text_config=cfg["text_encoder"])
    kw.update(over)
    return ldm_to_diffusers(state, **kw)


def _assert_bit_equal(got: dict, ref: dict, name: str) -> None:
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    assert not missing and not extra, f"{name}: missing {missing[:5]}, extra {extra[:5]}"
    worst = 0.0
    for k, r in ref.items():
        g = got[k]
        assert g.dtype == r.dtype and g.shape == r.shape, f"{name} {k}: {g.dtype}{g.shape} vs {r.dtype}{r.shape}"
        worst = max(worst, float(np.abs(g.astype(np.float64) - r.astype(np.float64)).max(initial=0.0)))
        assert g.tobytes() == r.tobytes(), f"{name} {k} differs"
    print(f"{name}: {len(ref)} tensors bit-equal, max abs err {worst}")


def test_single_file_converts_bit_for_bit(ldm_dir):
    conv = load_single_file(ldm_dir / "model.safetensors", base=ldm_dir)
    for comp, rel in COMPONENT_FILES.items():
        _assert_bit_equal(getattr(conv, comp), load_safetensors(ldm_dir / rel), comp)
    assert conv.ignored == [] and conv.not_converted == []


def test_mapping_agrees_with_observed_key_mapping(ldm_dir, ldm_state, tiny_configs):
    """Test oracle only: every row of the observed mapping is what the rule-derived mapping produced."""
    conv = _convert(ldm_state, tiny_configs)
    rows = json.loads((ldm_dir / "key_mapping.json").read_text())
    assert len(rows) == len(ldm_state) == 780
    for row in rows:
        got = getattr(conv, row["component"])[row["diffusers_key"]]
        assert list(got.shape) == row["diffusers_shape"], row
        assert np.array_equal(got.reshape(-1), ldm_state[row["ldm_key"]].reshape(-1)), row
    print(f"{len(rows)} observed (ldm_key -> diffusers_key) rows reproduced, 8 reshaped:",
          sum(r["reshaped"] for r in rows))


def test_non_weight_keys_are_ignored_and_reported(ldm_dir, ldm_state, tiny_configs):
    extras = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
        "model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(10),
        "model_ema.diffusion_modelinput_blocks00weight": np.zeros((16, 4, 3, 3), np.float32),
        "betas": np.zeros(1000, np.float32), "alphas_cumprod": np.zeros(1000, np.float32),
        "alphas_cumprod_prev": np.zeros(1000, np.float32), "sqrt_alphas_cumprod": np.zeros(1000, np.float32),
        "sqrt_one_minus_alphas_cumprod": np.zeros(1000, np.float32),
        "log_one_minus_alphas_cumprod": np.zeros(1000, np.float32),
        "sqrt_recip_alphas_cumprod": np.zeros(1000, np.float32),
        "sqrt_recipm1_alphas_cumprod": np.zeros(1000, np.float32),
        "posterior_variance": np.zeros(1000, np.float32), "posterior_log_variance_clipped": np.zeros(1000, np.float32),
        "posterior_mean_coef1": np.zeros(1000, np.float32), "posterior_mean_coef2": np.zeros(1000, np.float32),
        "logvar": np.zeros(1000, np.float32),
    }
    conv = _convert({**ldm_state, **extras}, tiny_configs)
    print("ignored:", conv.ignored)
    assert sorted(conv.ignored) == sorted(extras)
    _assert_bit_equal(conv.unet, load_safetensors(ldm_dir / COMPONENT_FILES["unet"]), "unet")


def test_float16_file_keeps_dtype(ldm_state, tiny_configs):
    half = {k: v.astype(np.float16) for k, v in ldm_state.items()}
    conv = _convert(half, tiny_configs)
    assert {v.dtype for c in (conv.unet, conv.vae, conv.text_encoder) for v in c.values()} == {np.dtype(np.float16)}


@pytest.mark.parametrize("extra", ["lora_unet_down_blocks_0_resnets_0_conv1.alpha",
                                   "model.diffusion_model.input_blocks.1.0.in_layers.1.weight",
                                   "model.diffusion_model.output_blocks.2.2.conv.weight",
                                   "first_stage_model.decoder.up.0.upsample.conv.weight",
                                   "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight",
                                   "control_model.input_hint_block.0.weight"])
def test_unknown_key_is_an_error_listing_it(ldm_state, tiny_configs, extra):
    with pytest.raises(LdmConversionError) as e:
        _convert({**ldm_state, extra: np.zeros((4, 4), np.float32)}, tiny_configs)
    print(e.value)
    assert extra in str(e.value)


def test_missing_module_is_an_error(ldm_state, tiny_configs):
    gone = "model.diffusion_model.output_blocks.5.2.conv"
    state = {k: v for k, v in ldm_state.items() if not k.startswith(gone)}
    with pytest.raises(LdmConversionError, match="missing") as e:
        _convert(state, tiny_configs)
    print(e.value)
    assert gone in str(e.value)


def test_config_mismatch_is_an_error(ldm_state, tiny_configs):
    bad = dict(tiny_configs["unet"], cross_attention_dim=64)
    with pytest.raises(LdmConversionError, match="contradict") as e:
        _convert(ldm_state, tiny_configs, unet_config=bad)
    print(str(e.value)[:300])
    assert "attn2.to_k.weight: [16, 32], config implies [*, 64]" in str(e.value)
    with pytest.raises(LdmConversionError):  # the default SD1.5 layout has a 4th level the tiny file lacks
        _convert(ldm_state, base_configs(None))
    with pytest.raises(LdmConversionError, match="use_linear_projection"):
        _convert(ldm_state, tiny_configs, unet_config=dict(tiny_configs["unet"], use_linear_projection=True))


def test_component_without_config_is_not_converted(ldm_state, tiny_configs):
    conv = _convert(ldm_state, tiny_configs, vae_config=None, text_config=None)
    assert conv.vae == {} and conv.text_encoder == {} and len(conv.unet) == 496
    assert len(conv.not_converted) == 248 + 36
    assert all(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in conv.not_converted)


def test_text_encoder_without_text_model_level(ldm_dir, ldm_state, tiny_configs):
    pre = "cond_stage_model.transformer.text_model."
    state = {k.replace(pre, "cond_stage_model.transformer."): v for k, v in ldm_state.items()}
    conv = _convert(state, tiny_configs)
    _assert_bit_equal(conv.text_encoder, load_safetensors(ldm_dir / COMPONENT_FILES["text_encoder"]), "text_encoder")


def test_other_family_is_refused_before_mapping(ldm_state, tiny_configs):
    sdxl = {**ldm_state, "conditioner.embedders.1.model.ln_final.weight": np.zeros(1280, np.float32)}
    with pytest.raises(ModelFamilyError, match="SDXL"):
        _convert(sdxl, tiny_configs)


def test_truncated_file_is_an_error(ldm_dir, tmp_path):
    raw = (ldm_dir / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightFileError, match="truncated") as e:
        load_single_file(bad, base=ldm_dir)
    print(e.value)


def test_ckpt_goes_through_torch(ldm_dir, tmp_path):
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"not a pickle")
    with pytest.raises(WeightFileError) as e:
        load_single_file(fake, base=ldm_dir)
    print(e.value)


@pytest.mark.torch
def test_ckpt_converts_like_safetensors(ldm_dir, ldm_state, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in ldm_state.items()}, "global_step": 3}, path)
    conv = load_single_file(path, base=ldm_dir)
    _assert_bit_equal(conv.unet, load_safetensors(ldm_dir / COMPONENT_FILES["unet"]), "unet (.ckpt)")


def test_base_folder_missing_config_is_an_error(ldm_dir, tmp_path):
    shutil.copytree(ldm_dir / "unet", tmp_path / "unet")
    with pytest.raises(WeightFileError, match="vae"):
        load_single_file(ldm_dir / "model.safetensors", base=tmp_path)


def test_default_configs_are_sd15():
    unet, vae, te = (sd15_default_config(c) for c in ("unet", "vae", "text_encoder"))
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert vae["block_out_channels"] == [128, 256, 512, 512] and te["hidden_size"] == 768
    assert sd15_default_config("scheduler")["beta_schedule"] == "scaled_linear"


# --- SD1.5 scale: LDM key names built the way the LDM UNet constructs itself (openaimodel.UNetModel) ----------

def _shape(*s):
    return np.broadcast_to(np.float32(0), s)  # shape only, no memory


def _ldm_sd15_unet(mc=320, mult=(1, 2, 4, 4), attn_levels=(0, 1, 2), n_res=2, ctx=768, cin=4) -> dict:
    sd, emb = {}, 4 * mc

    def res(p, a, b):
        sd.update({f"{p}.in_layers.0.weight": _shape(a), f"{p}.in_layers.0.bias": _shape(a),
                   f"{p}.in_layers.2.weight": _shape(b, a, 3, 3), f"{p}.in_layers.2.bias": _shape(b),
                   f"{p}.emb_layers.1.weight": _shape(b, emb), f"{p}.emb_layers.1.bias": _shape(b),
                   f"{p}.out_layers.0.weight": _shape(b), f"{p}.out_layers.0.bias": _shape(b),
                   f"{p}.out_layers.3.weight": _shape(b, b, 3, 3), f"{p}.out_layers.3.bias": _shape(b)})
        if a != b:
            sd.update({f"{p}.skip_connection.weight": _shape(b, a, 1, 1), f"{p}.skip_connection.bias": _shape(b)})

    def st(p, c):
        t = f"{p}.transformer_blocks.0"
        sd.update({f"{p}.norm.weight": _shape(c), f"{p}.norm.bias": _shape(c),
                   f"{p}.proj_in.weight": _shape(c, c, 1, 1), f"{p}.proj_in.bias": _shape(c),
                   f"{p}.proj_out.weight": _shape(c, c, 1, 1), f"{p}.proj_out.bias": _shape(c),
                   f"{t}.ff.net.0.proj.weight": _shape(8 * c, c), f"{t}.ff.net.0.proj.bias": _shape(8 * c),
                   f"{t}.ff.net.2.weight": _shape(c, 4 * c), f"{t}.ff.net.2.bias": _shape(c)})
        for n in (1, 2, 3):
            sd.update({f"{t}.norm{n}.weight": _shape(c), f"{t}.norm{n}.bias": _shape(c)})
        for a, kv in (("attn1", c), ("attn2", ctx)):
            sd.update({f"{t}.{a}.to_q.weight": _shape(c, c), f"{t}.{a}.to_k.weight": _shape(c, kv),
                       f"{t}.{a}.to_v.weight": _shape(c, kv), f"{t}.{a}.to_out.0.weight": _shape(c, c),
                       f"{t}.{a}.to_out.0.bias": _shape(c)})

    sd.update({"time_embed.0.weight": _shape(emb, mc), "time_embed.0.bias": _shape(emb),
               "time_embed.2.weight": _shape(emb, emb), "time_embed.2.bias": _shape(emb),
               "input_blocks.0.0.weight": _shape(mc, cin, 3, 3), "input_blocks.0.0.bias": _shape(mc)})
    chans, ch, n = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            res(f"input_blocks.{n}.0", ch, m * mc)
            ch = m * mc
            if level in attn_levels:
                st(f"input_blocks.{n}.1", ch)
            chans.append(ch)
            n += 1
        if level != len(mult) - 1:
            sd.update({f"input_blocks.{n}.0.op.weight": _shape(ch, ch, 3, 3),
                       f"input_blocks.{n}.0.op.bias": _shape(ch)})
            chans.append(ch)
            n += 1
    res("middle_block.0", ch, ch)
    st("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    n = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(n_res + 1):
            res(f"output_blocks.{n}.0", ch + chans.pop(), m * mc)
            ch, layer = m * mc, 1
            if level in attn_levels:
                st(f"output_blocks.{n}.1", ch)
                layer = 2
            if level and i == n_res:
                sd.update({f"output_blocks.{n}.{layer}.conv.weight": _shape(ch, ch, 3, 3),
                           f"output_blocks.{n}.{layer}.conv.bias": _shape(ch)})
            n += 1
    sd.update({"out.0.weight": _shape(mc), "out.0.bias": _shape(mc),
               "out.2.weight": _shape(4, mc, 3, 3), "out.2.bias": _shape(4)})
    return {"model.diffusion_model." + k: v for k, v in sd.items()}


def test_sd15_unet_layout_matches_manifest(golden_dir):
    """The rule-derived mapping at SD1.5 size gives exactly the 686 SD keys and shapes of the official manifest."""
    manifest = read_json(golden_dir / "manifest_sd15" / "pasd_unet_sd15_manifest.json", "manifest")
    want = {k: tuple(v["shape"]) for k, v in manifest.items() if not is_paca_key(k)}
    state = _ldm_sd15_unet()
    conv = ldm_to_diffusers(state, unet_config=sd15_default_config("unet"), vae_config=None, text_config=None)
    got = {k: tuple(v.shape) for k, v in conv.unet.items()}
    print(f"SD1.5: {len(state)} LDM UNet keys -> {len(got)} diffusers keys; manifest has {len(want)} SD keys")
    assert len(want) == 686
    assert got == want
