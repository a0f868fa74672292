"""Every LoRA format users have for SD1.5 (issue 15, items 1 and 3), as small files written the way each tool writes
them, for the tiny SD model of `ldm_single_file` (UNet 16/24/32 channels, CLIP width 32).

Each fused weight is checked against its format's formula computed here in float64, written independently of the
implementation (explicit loops / index formulas): kohya `lora_unet_*` + `.alpha`; diffusers `save_lora_weights`
(`unet.<attn>.lora.down.weight`, `unet.<other>.lora_A.weight`, `text_encoder.<...>.lora_linear_layer.down.weight`)
and the older attention-processor names; PEFT `base_model.model.*.lora_A.weight` + `adapter_config.json`;
LyCORIS LoCon-Tucker, LoHa (plain and Tucker) and LoKr (decomposed, full, conv).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from pasd_jax.convert.io import load_safetensors
from pasd_jax.convert.lora import (LoraError, LoraSpec, merge_lora_file, merge_lora_files, parse_lora_arg,
                                   read_lora)

# Fused values are |W + delta| < 1, so each float32 rounding is <= 6e-8; the merge does a handful (the float16
# LoRA tensors are exact in float32). Measured max errors are printed (all <= 2.4e-7).
TOL = 1e-6
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
K2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"        # [16, 32]: cross-attention
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"     # [128, 16]: GEGLU
PROJ_IN = "down_blocks.0.attentions.0.proj_in"                           # 1x1 conv
SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"                         # 1x1 conv [32, 64]
TEMB = "down_blocks.0.resnets.0.time_emb_proj"
LIN1 = "time_embedding.linear_1"
CONV_IN = "conv_in"                                                      # 3x3 [16, 4]
CONV1 = "down_blocks.0.resnets.0.conv1"                                  # 3x3 [16, 16]
TE_Q, TE_OUT, TE_FC1 = (f"text_model.encoder.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.out_proj",
                                                                     "mlp.fc1"))
ATTN = (Q, OUT0, K2)
UNET_MODULES = (Q, OUT0, K2, FF, PROJ_IN, SHORTCUT, TEMB, LIN1, CONV_IN, CONV1)
TE_MODULES = (TE_Q, TE_OUT, TE_FC1)


@pytest.fixture(scope="module")
def base(golden_dir):
    d = golden_dir / "ldm_single_file"
    return {"unet": load_safetensors(d / "unet" / "diffusion_pytorch_model.safetensors"),
            "text_encoder": load_safetensors(d / "text_encoder" / "model.safetensors")}


def _a(alpha: float) -> np.ndarray:
    return np.array(alpha, dtype=np.float16)  # kohya: a 0-dim float16 tensor


def _comp(module: str) -> str:
    return "text_encoder" if module.startswith("text_model") else "unet"


def _pair(rng, w: np.ndarray, rank: int, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) as a trainer stores them: down (r, in[, kh, kw]), up (out, r[, 1, 1])."""
    out, inp, *k = w.shape
    down = (rng.standard_normal((rank, inp, *k)) / np.sqrt(inp * np.prod(k or [1]))).astype(dtype)
    up = (0.2 * rng.standard_normal((out, rank, *([1, 1] if k else [])))).astype(dtype)
    return down, up


def _ref_delta(down: np.ndarray, up: np.ndarray) -> np.ndarray:
    """up @ down in float64, one kernel tap at a time for convs."""
    d, u = down.astype(np.float64), up.astype(np.float64)
    if d.ndim == 2:
        return u @ d
    out = np.zeros((u.shape[0], d.shape[1], *d.shape[2:]))
    for y in range(d.shape[2]):
        for x in range(d.shape[3]):
            out[:, :, y, x] = u[:, :, 0, 0] @ d[:, :, y, x]
    return out


def _check(merged, base, expected: dict[str, np.ndarray], what: str) -> None:
    """`expected`: module -> float64 delta already scaled; every other tensor must be unchanged."""
    got = {"unet": merged.unet, "text_encoder": merged.text_encoder}
    assert sorted(merged.changed) == sorted(f"{_comp(m)}.{m}.weight" for m in expected)
    errs = {}
    for m, delta in expected.items():
        key, comp = m + ".weight", _comp(m)
        w = got[comp][key]
        assert w.dtype == np.float32 and w.shape == base[comp][key].shape
        errs[m] = float(np.abs(w - (base[comp][key].astype(np.float64) + delta.reshape(w.shape))).max())
        assert float(np.abs(delta).max()) > 1e-2  # the update is large enough for the check to mean something
    print(f"{what}: {len(expected)} modules, max abs err {max(errs.values()):.3g}")
    assert max(errs.values()) <= TOL, {m: e for m, e in errs.items() if e > TOL}
    for comp in got:
        if got[comp] is not None:
            assert all(got[comp][k] is v for k, v in base[comp].items() if f"{comp}.{k}" not in merged.changed)


def _kohya_name(m: str) -> str:
    return ("lora_te_" if _comp(m) == "text_encoder" else "lora_unet_") + m.replace(".", "_")


# ------------------------------------------------------------------------------------------ kohya

def test_kohya_linears_convs_time_embedding_and_text_encoder(base, tmp_path):
    rng = np.random.default_rng(1)
    state, expected = {}, {}
    for i, m in enumerate(UNET_MODULES + TE_MODULES):
        rank, alpha = (2, 1.0) if m in (CONV_IN, TEMB) else (4, 2.0 if i % 2 else 8.0)
        down, up = _pair(rng, base[_comp(m)][m + ".weight"], rank)
        n = _kohya_name(m)
        state |= {f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": _a(alpha)}
        expected[m] = 0.7 * alpha / rank * _ref_delta(down, up)
    save_file(state, str(tmp_path / "k.safetensors"), metadata={"ss_network_module": "networks.lora",
                                                               "ss_base_model_version": "sd_v1"})
    merged = merge_lora_file(tmp_path / "k.safetensors", multiplier=0.7, **base)
    _check(merged, base, expected, "kohya (alpha/rank per module)")


def test_kohya_official_rule_ignores_alpha(base, tmp_path):
    rng = np.random.default_rng(2)
    down, up = _pair(rng, base["unet"][Q + ".weight"], 4)
    n = _kohya_name(Q)
    save_file({f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": _a(1.0)},
              str(tmp_path / "k.safetensors"))
    merged = merge_lora_file(tmp_path / "k.safetensors", multiplier=0.6, rule="official", unet=base["unet"])
    _check(merged, base, {Q: 0.6 * _ref_delta(down, up)}, "kohya, rule=official")


@pytest.mark.parametrize("case", ["most common alpha", "no alphas: first module's rank"])
def test_kohya_missing_alphas_follow_diffusers(base, tmp_path, case):
    """diffusers 0.29.2 builds one lora_alpha per component: modules without an alpha get the most common one; with
    no alphas at all, lora_alpha = the first module's rank (the first `lora_down` key in file order)."""
    rng = np.random.default_rng(3)
    plan = {PROJ_IN: (2, 1.0), Q: (4, 2.0), OUT0: (4, 2.0), TEMB: (4, None)}  # sorted file order: proj_in first
    state, expected = {}, {}
    for m, (rank, alpha) in plan.items():
        down, up = _pair(rng, base["unet"][m + ".weight"], rank)
        n = _kohya_name(m)
        state |= {f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up}
        if case == "most common alpha" and alpha is not None:
            state[f"{n}.alpha"] = _a(alpha)
        used = (alpha if alpha is not None else 2.0) if case == "most common alpha" else 2.0  # rank of proj_in
        expected[m] = used / rank * _ref_delta(down, up)
    save_file(state, str(tmp_path / "k.safetensors"))
    _check(merge_lora_file(tmp_path / "k.safetensors", unet=base["unet"]), base, expected, f"kohya, {case}")


def test_locon_tucker(base, tmp_path):
    rng = np.random.default_rng(4)
    w = base["unet"][CONV1 + ".weight"]
    r = 3
    down = (rng.standard_normal((r, 16, 1, 1)) / 4).astype(np.float16)
    mid = (rng.standard_normal((r, r, 3, 3)) / 3).astype(np.float16)
    up = (0.2 * rng.standard_normal((16, r, 1, 1))).astype(np.float16)
    n = _kohya_name(CONV1)
    save_file({f"{n}.lora_down.weight": down, f"{n}.lora_mid.weight": mid, f"{n}.lora_up.weight": up,
               f"{n}.alpha": _a(1.5)}, str(tmp_path / "t.safetensors"))
    delta = np.zeros(w.shape)
    for y in range(3):
        for x in range(3):
            delta[:, :, y, x] = up[:, :, 0, 0].astype(np.float64) @ mid[:, :, y, x] @ down[:, :, 0, 0]
    _check(merge_lora_file(tmp_path / "t.safetensors", unet=base["unet"]), base, {CONV1: 0.5 * delta},
           "LoCon Tucker (lora_mid)")
    with pytest.raises(LoraError, match=r"Tucker \(lora_mid\) module cannot be merged with rule='official'"):
        merge_lora_file(tmp_path / "t.safetensors", unet=base["unet"], rule="official")


# ------------------------------------------------------------------------------------------ diffusers / PEFT

def _diffusers_state(rng, base, modules, rank_of, dtype=np.float32):
    """Keys as diffusers' training scripts save them: convert_state_dict_to_diffusers(get_peft_model_state_dict)."""
    state, pairs = {}, {}
    for m in modules:
        down, up = _pair(rng, base[_comp(m)][m + ".weight"], rank_of(m), dtype)
        pairs[m] = (down, up)
        if _comp(m) == "text_encoder":
            pre, a, b = f"text_encoder.{m}", "lora_linear_layer.down", "lora_linear_layer.up"
        else:
            pre = f"unet.{m}"
            a, b = ("lora.down", "lora.up") if m in ATTN else ("lora_A", "lora_B")
        state |= {f"{pre}.{a}.weight": down, f"{pre}.{b}.weight": up}
    return state, pairs


def test_diffusers_save_lora_weights_names(base, tmp_path):
    rng = np.random.default_rng(5)
    state, pairs = _diffusers_state(rng, base, UNET_MODULES + TE_MODULES, lambda m: 4)
    (tmp_path / "lora").mkdir()
    save_file(state, str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    merged = merge_lora_file(tmp_path / "lora", multiplier=0.8, **base)  # a folder, as `load_lora_weights(folder)`
    _check(merged, base, {m: 0.8 * _ref_delta(*p) for m, p in pairs.items()}, "diffusers names, one rank")


def test_diffusers_no_alpha_mixed_ranks_quirk(base, tmp_path):
    """diffusers 0.29.2: no alphas -> lora_alpha = rank of the first lora_B key (UNet, in sorted key order) and of
    layer 0's out_proj (text encoder), so each module scales by that rank / its own rank, not by 1."""
    rng = np.random.default_rng(6)
    ranks = {PROJ_IN: 2, Q: 4, FF: 4, TEMB: 8, TE_Q: 4, TE_OUT: 2, TE_FC1: 4}
    state, pairs = _diffusers_state(rng, base, list(ranks), ranks.__getitem__)
    save_file(state, str(tmp_path / "d.safetensors"))
    first = {"unet": 2, "text_encoder": 2}  # unet.down_blocks.0.attentions.0.proj_in.lora_B sorts first
    expected = {m: first[_comp(m)] / ranks[m] * _ref_delta(*p) for m, p in pairs.items()}
    _check(merge_lora_file(tmp_path / "d.safetensors", **base), base, expected, "diffusers names, mixed ranks")


def test_attention_processor_names(base, tmp_path):
    """The older diffusers layout (`unet.load_attn_procs`): no `unet.` prefix, `.processor.to_q_lora.down`."""
    rng = np.random.default_rng(7)
    state, expected = {}, {}
    for m, child in ((Q, "to_q"), (OUT0, "to_out"), (K2, "to_k")):
        down, up = _pair(rng, base["unet"][m + ".weight"], 4)
        parent = m.rsplit(".", 2 if m.endswith(".0") else 1)[0]
        state |= {f"{parent}.processor.{child}_lora.down.weight": down,
                  f"{parent}.processor.{child}_lora.up.weight": up}
        expected[m] = _ref_delta(down, up)
    down, up = _pair(rng, base["text_encoder"][TE_Q + ".weight"], 4)
    state |= {"text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": down,
              "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": up}
    expected[TE_Q] = _ref_delta(down, up)
    save_file(state, str(tmp_path / "p.bin.safetensors"))
    _check(merge_lora_file(tmp_path / "p.bin.safetensors", **base), base, expected, "attention-processor names")


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_with_config(base, tmp_path, rslora):
    rng = np.random.default_rng(8)
    ranks = {Q: 4, K2: 4, PROJ_IN: 2, CONV1: 4, LIN1: 4}
    state, expected = {}, {}
    for m, r in ranks.items():
        down, up = _pair(rng, base["unet"][m + ".weight"], r, np.float32)
        state |= {f"base_model.model.{m}.lora_A.weight": down, f"base_model.model.{m}.lora_B.weight": up}
        alpha = 1.0 if m == PROJ_IN else 8.0
        expected[m] = alpha / (np.sqrt(r) if rslora else r) * _ref_delta(down, up)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"attentions.0.proj_in": 2},
         "alpha_pattern": {"attentions.0.proj_in": 1}, "use_rslora": rslora, "target_modules": ["to_q"]}))
    _check(merge_lora_file(folder, unet=base["unet"]), base, expected, f"PEFT adapter (use_rslora={rslora})")


def test_diffusers_names_with_adapter_config(base, tmp_path):
    rng = np.random.default_rng(9)
    down, up = _pair(rng, base["unet"][FF + ".weight"], 4, np.float32)
    save_file({f"unet.{FF}.lora_A.weight": down, f"unet.{FF}.lora_B.weight": up},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    _check(merge_lora_file(tmp_path, unet=base["unet"]), base, {FF: 0.5 * _ref_delta(down, up)},
           "unet.* lora_A names + adapter_config.json")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8}))
    with pytest.raises(LoraError, match=r"ff.net.0.proj: rank 4 in the weights, but the adapter config says r=8"):
        merge_lora_file(tmp_path, unet=base["unet"])


# ------------------------------------------------------------------------------------------ LyCORIS

def _tucker_ref(t, wa, wb):
    """Core t (r, r, kh, kw), wa (r, out), wb (r, in): each tap is wa^T @ t[:, :, y, x] @ wb."""
    out = np.zeros((wa.shape[1], wb.shape[1], *t.shape[2:]))
    for y in range(t.shape[2]):
        for x in range(t.shape[3]):
            out[:, :, y, x] = wa.T.astype(np.float64) @ t[:, :, y, x] @ wb
    return out


def test_loha_plain_and_tucker(base, tmp_path):
    rng = np.random.default_rng(10)
    h = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float16)  # noqa: E731
    r = 4
    state, expected = {}, {}
    n = _kohya_name(Q)  # Linear: w1_a (out, r), w1_b (r, in)
    p = {"w1_a": h(16, r), "w1_b": h(r, 16), "w2_a": h(16, r), "w2_b": h(r, 16)}
    state |= {f"{n}.hada_{k}": v for k, v in p.items()} | {f"{n}.alpha": _a(2.0)}
    expected[Q] = 0.5 * ((p["w1_a"].astype(np.float64) @ p["w1_b"]) * (p["w2_a"].astype(np.float64) @ p["w2_b"]))
    n = _kohya_name(CONV1)  # 3x3 conv, no Tucker: w_b (r, in*3*3)
    p = {"w1_a": h(16, r), "w1_b": h(r, 16 * 9), "w2_a": h(16, r), "w2_b": h(r, 16 * 9)}
    state |= {f"{n}.hada_{k}": v for k, v in p.items()}  # no alpha: scale 1
    expected[CONV1] = ((p["w1_a"].astype(np.float64) @ p["w1_b"]) * (p["w2_a"].astype(np.float64) @ p["w2_b"]))
    n = _kohya_name(CONV_IN)  # 3x3 conv with Tucker cores: w_a (r, out), w_b (r, in)
    p = {"w1_a": h(r, 16), "w1_b": h(r, 4), "t1": h(r, r, 3, 3), "w2_a": h(r, 16), "w2_b": h(r, 4),
         "t2": h(r, r, 3, 3)}
    state |= {f"{n}.hada_{k}": v for k, v in p.items()} | {f"{n}.alpha": _a(1.0)}
    expected[CONV_IN] = 0.25 * _tucker_ref(p["t1"], p["w1_a"], p["w1_b"]) * _tucker_ref(p["t2"], p["w2_a"], p["w2_b"])
    save_file(state, str(tmp_path / "loha.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    _check(merge_lora_file(tmp_path / "loha.safetensors", unet=base["unet"]), base, expected, "LoHa")
    with pytest.raises(LoraError, match=r"loha module cannot be merged with rule='official'"):
        merge_lora_file(tmp_path / "loha.safetensors", unet=base["unet"], rule="official")


def _kron_ref(w1, w2):
    """delta[i*b + j, k*d + l, ...] = w1[i, k] * w2[j, l, ...]."""
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    out = np.zeros((a * b, c * d, *w2.shape[2:]))
    for i in range(a):
        for k in range(c):
            out[i * b:(i + 1) * b, k * d:(k + 1) * d] = float(w1[i, k]) * w2.astype(np.float64)
    return out


def test_lokr_decomposed_full_and_conv(base, tmp_path):
    rng = np.random.default_rng(11)
    h = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float16)  # noqa: E731
    state, expected = {}, {}
    n = _kohya_name(OUT0)  # Linear [16, 16] = (4 x 4) kron (4 x 4), w2 decomposed at rank 2
    w1, w2a, w2b = h(4, 4), h(4, 2), h(2, 4)
    state |= {f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b, f"{n}.alpha": _a(1.0)}
    expected[OUT0] = 0.5 * _kron_ref(w1, w2a.astype(np.float64) @ w2b)
    n = _kohya_name(K2)  # Linear [16, 32], both factors full: scale 1 whatever the alpha
    w1, w2 = h(2, 4), h(8, 8)
    state |= {f"{n}.lokr_w1": w1, f"{n}.lokr_w2": w2, f"{n}.alpha": _a(3.0)}
    expected[K2] = _kron_ref(w1, w2)
    n = _kohya_name(CONV1)  # 3x3 conv [16, 16, 3, 3]: w1 (2, 2), w2 decomposed as (8, r) @ (r, 8*3*3)
    w1, w2a, w2b = h(2, 2), h(8, 2), h(2, 8 * 9)
    state |= {f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b, f"{n}.alpha": _a(4.0)}
    expected[CONV1] = 2.0 * _kron_ref(w1, (w2a.astype(np.float64) @ w2b).reshape(8, 8, 3, 3))
    save_file(state, str(tmp_path / "lokr.safetensors"))
    _check(merge_lora_file(tmp_path / "lokr.safetensors", unet=base["unet"]), base, expected, "LoKr")


# ------------------------------------------------------------------------------------------ several, arguments, errors

def test_several_loras_each_with_its_weight(base, tmp_path):
    rng = np.random.default_rng(12)
    d1, u1 = _pair(rng, base["unet"][Q + ".weight"], 4)
    n = _kohya_name(Q)
    save_file({f"{n}.lora_down.weight": d1, f"{n}.lora_up.weight": u1, f"{n}.alpha": _a(2.0)},
              str(tmp_path / "style.safetensors"))
    state, pairs = _diffusers_state(rng, base, (Q, CONV1), lambda m: 4)
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    files = [(read_lora(tmp_path / "style.safetensors"), 0.6, "official"),
             (read_lora(tmp_path / "pytorch_lora_weights.safetensors"), 1.0, "alpha_scaled")]
    merged = merge_lora_files(files, unet=base["unet"])
    expected = {Q: 0.6 * _ref_delta(d1, u1) + _ref_delta(*pairs[Q]), CONV1: _ref_delta(*pairs[CONV1])}
    _check(merged, base, expected, "kohya x0.6 (official) + diffusers x1.0")


def test_lora_argument():
    assert parse_lora_arg("styles/a.safetensors:0.7") == LoraSpec("styles/a.safetensors", 0.7)
    assert parse_lora_arg("styles/a.safetensors", default_multiplier=0.6) == LoraSpec("styles/a.safetensors", 0.6)
    assert parse_lora_arg("odd:name/a.safetensors").path == "odd:name/a.safetensors"
    assert parse_lora_arg("lcm/:1.5", rule="official") == LoraSpec("lcm/", 1.5, "official")


def test_bad_files_are_named(base, tmp_path):
    rng = np.random.default_rng(13)
    state, _ = _diffusers_state(rng, base, (Q,), lambda m: 4)
    save_file(state, str(tmp_path / "d.safetensors"))
    with pytest.raises(LoraError, match=r"rule='official' .* reads only kohya files .* diffusers LoRA") as e:
        merge_lora_file(tmp_path / "d.safetensors", unet=base["unet"], rule="official")
    print(e.value)
    wrong = {k.replace("attn1", "attn3"): v for k, v in state.items()}
    save_file(wrong, str(tmp_path / "w.safetensors"))
    with pytest.raises(LoraError, match=r"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q: no such "
                                        r"module in the unet") as e:
        merge_lora_file(tmp_path / "w.safetensors", unet=base["unet"])
    print(e.value)
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        save_file(state, str(tmp_path / "two" / name))
    with pytest.raises(Exception, match=r"several weight files \(a.safetensors, b.safetensors\)"):
        read_lora(tmp_path / "two")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(Exception, match=r"truncated|PEFT LOHA adapter"):
        read_lora(tmp_path / "x")
