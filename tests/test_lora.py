"""kohya LoRA merging (issue 6, item 3): both merge rules against the golden merged tensors, bad LoRAs, and the
fused-weight cache (issue 15, item 4)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

from pasd_jax.convert.cache import ConversionCache
from pasd_jax.convert.family import ModelFamilyError
from pasd_jax.convert.io import load_safetensors
from pasd_jax.convert.lora import LoraError, merge_lora, merge_lora_file, module_index
from pasd_jax.convert.lora_params import fuse_loras
from pasd_jax.convert.naming import to_torch_layout, torch_key

TOL = 1e-6
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def base(golden_dir):
    d = golden_dir / "ldm_single_file"
    return (load_safetensors(d / "unet" / "diffusion_pytorch_model.safetensors"),
            load_safetensors(d / "text_encoder" / "model.safetensors"))


@pytest.fixture(scope="module")
def lora_dir(golden_dir):
    return golden_dir / "lora"


@pytest.fixture(scope="module")
def lora(lora_dir):
    return load_safetensors(lora_dir / "lora_kohya.safetensors")


def _split(key: str) -> tuple[str, str]:
    comp, _, rest = key.partition(".")
    return comp, rest


@pytest.mark.parametrize("lora_file,rule,golden", [
    ("lora_kohya", "official", "merged_pasd_official_mult0.6"),
    ("lora_kohya", "alpha_scaled", "merged_alpha_scaled_mult0.6"),
    ("lora_kohya_conv3x3", "alpha_scaled", "merged_alpha_scaled_conv3x3_mult0.6"),
])
def test_merge_matches_golden(base, lora_dir, lora_file, rule, golden):
    unet, te = base
    merged = merge_lora_file(lora_dir / f"{lora_file}.safetensors", unet=unet, text_encoder=te, multiplier=0.6,
                             rule=rule)
    ref = load_safetensors(lora_dir / f"{golden}.safetensors")
    assert sorted(merged.changed) == sorted(ref)
    out = {"unet": merged.unet, "text_encoder": merged.text_encoder}
    errs = {k: float(np.abs(out[_split(k)[0]][_split(k)[1]] - v).max()) for k, v in ref.items()}
    print(f"{golden}: {len(ref)} tensors, max abs err {max(errs.values()):.3g}")
    assert max(errs.values()) <= TOL, {k: e for k, e in errs.items() if e > TOL}
    for k, v in ref.items():  # the merge really changed each golden tensor
        comp, key = _split(k)
        assert out[comp][key].dtype == np.float32
        assert not np.array_equal({"unet": unet, "text_encoder": te}[comp][key], v)
    for comp, src in (("unet", unet), ("text_encoder", te)):  # everything else is the base, untouched
        untouched = [k for k in src if f"{comp}.{k}" not in ref]
        assert all(out[comp][k] is src[k] for k in untouched)


def test_rules_differ_by_rank_over_alpha(base, lora):
    unet, te = base
    off = merge_lora(lora, unet=unet, text_encoder=te, multiplier=0.6, rule="official")
    std = merge_lora(lora, unet=unet, text_encoder=te, multiplier=0.6)
    key = TO_Q + ".weight"  # alpha 2, rank 4
    ratio = (off.unet[key] - unet[key]) / (std.unet[key] - unet[key])
    print("official / alpha-scaled delta ratio on to_q:", float(ratio.min()), float(ratio.max()))
    np.testing.assert_allclose(ratio, 2.0, rtol=1e-3)


def test_official_rule_refuses_3x3_conv(base, lora_dir):
    unet, te = base
    before = {k: v.copy() for k, v in unet.items()}
    with pytest.raises(LoraError, match=r"3x3 conv LoRA .*rule='official'") as e:
        merge_lora_file(lora_dir / "lora_kohya_conv3x3.safetensors", unet=unet, text_encoder=te, multiplier=0.6,
                        rule="official")
    print(e.value)
    assert all(np.array_equal(before[k], unet[k]) for k in unet)


def test_missing_component_is_skipped_and_reported(base, lora):
    unet, _ = base
    merged = merge_lora(lora, unet=unet, text_encoder=None, multiplier=0.6)
    assert merged.text_encoder is None
    assert len(merged.skipped) == 12 and all(n.startswith("lora_te_") for n in merged.skipped)
    assert len(merged.changed) == 13


def test_single_module_without_alpha_scales_by_one(base, lora):
    """No alphas: diffusers' lora_alpha is the first module's rank, here the only module's (kohya: alpha = rank)."""
    unet, _ = base
    name = "lora_unet_" + TO_Q.replace(".", "_")
    one = {k: v for k, v in lora.items() if k.startswith(name + ".lora_")}
    merged = merge_lora(one, unet=unet, multiplier=0.6)
    up = lora[name + ".lora_up.weight"].astype(np.float32)
    down = lora[name + ".lora_down.weight"].astype(np.float32)
    want = unet[TO_Q + ".weight"] + np.float32(0.6) * (up @ down)
    err = float(np.abs(merged.unet[TO_Q + ".weight"] - want).max())
    print("no-alpha merge max abs err", err)
    assert err <= TOL


def test_float16_target_keeps_dtype(base, lora, lora_dir):
    unet, te = base
    half = {k: v.astype(np.float16) for k, v in unet.items()}
    merged = merge_lora(lora, unet=half, text_encoder=te, multiplier=0.6)
    ref = load_safetensors(lora_dir / "merged_alpha_scaled_mult0.6.safetensors")["unet." + TO_Q + ".weight"]
    got = merged.unet[TO_Q + ".weight"]
    err = np.abs(got.astype(np.float32) - ref)
    # two float16 roundings (of the base weight, then of the result), each at most half an ulp = 2^-11 relative
    bound = 2.0 ** -11 * (np.abs(unet[TO_Q + ".weight"]) + np.abs(ref)) + TOL
    print("float16 target: max abs err vs float32 golden", float(err.max()), "bound", float(bound.max()))
    assert got.dtype == np.float16 and np.all(err <= bound)


def test_names_resolve_exactly_not_greedily():
    # two modules whose `_`-joined names collide: a greedy splitter would silently pick one
    target = {"a.b_c.weight": np.zeros((2, 2), np.float32), "a_b.c.weight": np.zeros((2, 2), np.float32),
              "a_b_d.weight": np.zeros((2, 2), np.float32)}
    assert module_index(target)["a_b_c"] == ["a.b_c", "a_b.c"]

    def lo(name):
        return {f"lora_unet_{name}.lora_down.weight": np.ones((1, 2), np.float16),
                f"lora_unet_{name}.lora_up.weight": np.ones((2, 1), np.float16)}

    with pytest.raises(LoraError, match=r"several unet modules \['a.b_c', 'a_b.c'\]"):
        merge_lora(lo("a_b_c"), unet=target)
    merged = merge_lora(lo("a_b_d"), unet=target)
    assert merged.changed == ["unet.a_b_d.weight"]


def _sd1_shaped(name, down_shape, up_shape):
    return {f"{name}.lora_down.weight": np.zeros(down_shape, np.float16),
            f"{name}.lora_up.weight": np.zeros(up_shape, np.float16), f"{name}.alpha": np.float16(4)}


@pytest.mark.parametrize("case,lora_keys,exc,pattern", [
    ("SDXL text encoders", _sd1_shaped("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (4, 768), (768, 4)),
     ModelFamilyError, r"SDXL.*lora_te1_"),
    ("SDXL UNet names", _sd1_shaped("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (4, 640), (640, 4)),
     ModelFamilyError, r"SDXL.*input_blocks"),
    ("SD2 cross-attention", _sd1_shaped("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                                        (4, 1024), (320, 4)), ModelFamilyError, r"2\.x.*cross-attention dim 1024"),
    ("SD2 text width", _sd1_shaped("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (4, 1024), (1024, 4)),
     ModelFamilyError, r"2\.x.*1024"),
    ("module absent", _sd1_shaped("lora_unet_down_blocks_3_attentions_0_proj_in", (4, 32, 1, 1), (32, 4, 1, 1)),
     LoraError, r"down_blocks_3_attentions_0_proj_in: no such module in the unet"),
    ("shape mismatch (SD1.5-sized LoRA on this model)",
     _sd1_shaped("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (4, 320), (320, 4)),
     LoraError, r"makes a \[320, 320\] update, unet `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
                r".weight` is \[16, 16\]"),
    ("incomplete LoHa", {"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": np.zeros((16, 4), np.float16)},
     LoraError, r"conv1: an incomplete loha module \(has \['w1_a'\]\)"),
    ("LoHa factors that do not chain",
     {f"lora_unet_down_blocks_0_resnets_0_conv1.hada_{k}": np.zeros(s, np.float16)
      for k, s in (("w1_a", (16, 4)), ("w1_b", (3, 144)), ("w2_a", (16, 4)), ("w2_b", (4, 144)))},
     LoraError, r"conv1: .* do not form a loha module \(factor shapes do not chain\)"),
    ("kohya DoRA", {**_sd1_shaped("lora_unet_down_blocks_0_attentions_0_proj_in", (4, 16, 1, 1), (16, 4, 1, 1)),
                    "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": np.ones((16, 1, 1, 1), np.float16)},
     LoraError, r"proj_in.dora_scale \(DoRA"),
    ("LyCORIS OFT", {"lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks": np.zeros((4, 4, 4), np.float16)},
     LoraError, r"conv1.oft_blocks \(OFT is not supported"),
    ("PEFT DoRA", {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.zeros((4, 16, 1, 1), np.float16),
                   "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": np.ones((16,), np.float16)},
     LoraError, r"lora_magnitude_vector \(DoRA"),
    ("SDXL diffusers names", {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                              np.zeros((4, 1280), np.float16)}, ModelFamilyError, r"SDXL.*text_encoder_2"),
    ("SD2 diffusers cross-attention",
     {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.zeros((4, 1024), np.float16),
      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.zeros((320, 4), np.float16)},
     ModelFamilyError, r"2\.x \(cross-attention dim 1024"),
    ("PEFT module absent", {"unet.down_blocks.0.attentions.0.proj_inn.lora_A.weight": np.zeros((4, 16), np.float16),
                            "unet.down_blocks.0.attentions.0.proj_inn.lora_B.weight": np.zeros((16, 4), np.float16)},
     LoraError, r"unet.down_blocks.0.attentions.0.proj_inn: no such module in the unet"),
    ("unknown diffusers key", {"unet.down_blocks.0.attentions.0.proj_in.weight": np.zeros((16, 16), np.float16)},
     LoraError, r"proj_in.weight \(not a LoRA key"),
])
def test_lora_for_another_architecture_is_refused(base, case, lora_keys, exc, pattern):
    unet, te = base
    with pytest.raises(exc, match=pattern) as e:
        merge_lora(lora_keys, unet=unet, text_encoder=te)
    print(f"{case}: {e.value}")


def test_sdxl_metadata_is_refused(base, lora):
    unet, te = base
    with pytest.raises(ModelFamilyError, match="sdxl_base_v1-0"):
        merge_lora(lora, unet=unet, text_encoder=te, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def test_unknown_rule(base, lora):
    with pytest.raises(ValueError, match="rule"):
        merge_lora(lora, unet=base[0], rule="diffusers")


# ------------------------------------------------------------------------------------------ fused-weight cache

def _flax_tree(state, keys):
    """A Flax-layout tree of these PyTorch-named weights (Dense [in, out], Conv HWIO), plus a bias leaf."""
    flat = {}
    for key in keys:
        path = []
        for seg in key[: -len(".weight")].split("."):
            if seg.isdigit():
                path[-1] += "_" + seg
            else:
                path.append(seg)
        w = state[key]
        flat[(*path, "kernel")] = w.T.copy() if w.ndim == 2 else np.transpose(w, (2, 3, 1, 0)).copy()
        flat[(*path, "bias")] = np.zeros(w.shape[0], np.float32)
    return unflatten_dict(flat)


def test_fused_weights_are_cached(base, lora_dir, tmp_path):
    unet_state, _ = base
    ref = load_safetensors(lora_dir / "merged_alpha_scaled_mult0.6.safetensors")
    keys = [k.split(".", 1)[1] for k in ref if k.startswith("unet.")] + ["conv_in.weight"]  # conv_in: untouched
    unet = _flax_tree(unet_state, keys)
    cache = ConversionCache(tmp_path / "cache")
    fused_runs: list[str] = []
    cache.hooks.append(fused_runs.append)
    lora = tmp_path / "style.safetensors"
    shutil.copy(lora_dir / "lora_kohya.safetensors", lora)

    first = fuse_loras([(lora, 0.6)], unet=unet, cache=cache)
    second = fuse_loras([(lora, 0.6)], unet=unet, cache=cache)
    assert len(fused_runs) == 1 and cache.stats.hits == 1 and second.from_cache and not first.from_cache
    a, b, src = flatten_dict(first.unet), flatten_dict(second.unet), flatten_dict(unet)
    assert all(np.array_equal(a[p], b[p]) and a[p].dtype == b[p].dtype for p in a)
    assert b[("conv_in", "kernel")] is src[("conv_in", "kernel")]  # untouched leaves stay the caller's objects
    err = max(float(np.abs(to_torch_layout(p, np.asarray(b[p])) - ref["unet." + torch_key(p)]).max())
              for p in b if p[-1] == "kernel" and p[0] != "conv_in")
    print(f"fused from the cache vs golden merge: max abs err {err:.3g}; skipped {len(second.skipped)} te modules")
    assert err <= TOL and len(second.skipped) == 12

    copied = tmp_path / "copy.safetensors"  # the key is the content, not the path
    shutil.copy(lora, copied)
    assert fuse_loras([(copied, 0.6)], unet=unet, cache=cache).from_cache and len(fused_runs) == 1

    assert not fuse_loras([(lora, 0.5)], unet=unet, cache=cache).from_cache  # another multiplier
    assert not fuse_loras([(lora, 0.6, "official")], unet=unet, cache=cache).from_cache  # another rule
    edited = load_safetensors(lora)
    name = "lora_unet_" + TO_Q.replace(".", "_") + ".lora_up.weight"
    edited[name] = edited[name] * np.float16(2)
    save_file(edited, str(lora))  # same path, new content
    assert not fuse_loras([(lora, 0.6)], unet=unet, cache=cache).from_cache
    moved = flatten_dict(unet)
    moved[("conv_in", "bias")] = moved[("conv_in", "bias")] + 1  # not targeted: same key
    assert fuse_loras([(lora, 0.6)], unet=unflatten_dict(moved), cache=cache).from_cache
    path = next(p for p in moved if p[-1] == "kernel" and p[0] != "conv_in")
    moved[path] = moved[path] + 1  # a targeted base tensor changed: fused again
    assert not fuse_loras([(lora, 0.6)], unet=unflatten_dict(moved), cache=cache).from_cache
    assert fuse_loras([(lora, 0.6)], unet=unflatten_dict(moved), cache=cache, base_id="ckpt-1").from_cache is False
    assert fuse_loras([(lora, 0.6)], unet=unflatten_dict(moved), cache=cache, base_id="ckpt-1").from_cache
    entries = len(list(cache.root.glob("*.safetensors")))
    print(f"{len(fused_runs)} fuses, {cache.stats.hits} hits, {entries} entries")
    # one entry per (base, LoRA paths): each new multiplier / rule / content replaced the previous one
    assert len(fused_runs) == 6 and cache.stats.hits == 4 and entries == 2
