"""Release export / import (issue 6, item 5) and bad input (item 6)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from pasd_jax.convert_cli import main as convert_main
from pasd_jax.convert.base import load_sd_base
from pasd_jax.convert.cache import CacheEntryError, ConversionCache
from pasd_jax.convert.family import ModelFamilyError
from pasd_jax.convert.folders import build_module
from pasd_jax.convert.io import WeightFileError, load_safetensors, read_json, save_safetensors
from pasd_jax.convert.lora import LoraError
from pasd_jax.convert.personalize import apply_lora, swap_base
from pasd_jax.convert.release import (FLAX_WEIGHTS, ReleaseError, ReleaseInfo, export_release, import_official,
                                      load_checkpoint, load_flax_checkpoint, release_key_shapes)
from pasd_jax.models.blocks import PASD
from pasd_jax.safe_write import OutputPathError

SUBS = ("unet", "controlnet")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return golden_dir / "tiny_pasd"


@pytest.fixture(scope="module")
def loaded(tiny, tmp_path_factory):
    return load_checkpoint(tiny, cache=ConversionCache(tmp_path_factory.mktemp("cache")))


def _same_tree(a, b) -> bool:
    fa, fb = flatten_dict(a), flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.asarray(fa[k]).tobytes() == np.asarray(fb[k]).tobytes() for k in fa)


def _assert_release_equals(folder, ref_folder, *, bitwise: bool) -> None:
    for sub in SUBS:
        got, ref = load_safetensors(folder / sub / WEIGHTS), load_safetensors(ref_folder / sub / WEIGHTS)
        assert list(got) and set(got) == set(ref), sub
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}, sub
        assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}
        if bitwise:
            same = sum(got[k].tobytes() == ref[k].tobytes() for k in ref)
            print(f"{sub}: {same}/{len(ref)} tensors bit-equal")
            assert same == len(ref)
        cfg = read_json(folder / sub / "config.json")
        build_module(sub, cfg, variant=PASD)  # the written config builds the model again


def test_sd15_release_key_set_equals_manifest(golden_dir):
    m = golden_dir / "manifest_sd15"
    unet = build_module("unet", read_json(m / "pasd_unet_sd15_config.json"), variant=PASD)
    controlnet = build_module("controlnet", read_json(m / "pasd_controlnet_sd15_config.json"))
    got = release_key_shapes(unet, controlnet)
    for sub in SUBS:
        want = {k: tuple(v["shape"]) for k, v in read_json(m / f"pasd_{sub}_sd15_manifest.json").items()}
        print(f"SD1.5 {sub}: {len(got[sub])} exported keys, manifest {len(want)}, "
              f"{sum(int(np.prod(s)) for s in got[sub].values()):,} params")
        assert got[sub] == want
    assert (len(got["unet"]), len(got["controlnet"])) == (998, 346)


def test_export_of_the_golden_checkpoint_round_trips(loaded, tiny, tmp_path):
    out = export_release(tmp_path / "release", unet=loaded["unet"], controlnet=loaded["controlnet"],
                         info=ReleaseInfo("pasd", step=7, base="sd15-folder", trainable_modules=("pixel_attentions",)))
    _assert_release_equals(out, tiny, bitwise=True)
    readme = (out / "README.md").read_text()
    assert "`pasd`" in readme and "training step: 7" in readme and "sd15-folder" in readme
    assert "`pixel_attentions`" in readme
    again = load_checkpoint(out, cache=False)
    assert all(_same_tree(again[s][1], loaded[s][1]) for s in SUBS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no staging folders left


def test_existing_output_needs_overwrite(loaded, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="already exists"):
        export_release(out, unet=loaded["unet"], controlnet=loaded["controlnet"], info=ReleaseInfo("pasd"))
    assert (out / "keep.txt").read_text() == "mine"
    export_release(out, unet=loaded["unet"], controlnet=loaded["controlnet"], info=ReleaseInfo("pasd"),
                   overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "unet" / WEIGHTS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_export_refuses_params_that_do_not_fit(loaded, tmp_path):
    unet_module, unet_params = loaded["unet"]
    flat = flatten_dict(unet_params)
    dropped = {k: v for k, v in flat.items() if "pixel_attentions_0" not in "/".join(k)}
    with pytest.raises(ReleaseError, match=r"missing") as e:
        export_release(tmp_path / "r", unet=(unet_module, unflatten_dict(dropped)), controlnet=loaded["controlnet"],
                       info=ReleaseInfo("pasd"))
    print(str(e.value)[:300])
    plain = build_module("unet", unet_module.config.to_dict(), variant="sd")
    with pytest.raises(ReleaseError, match="plain SD UNet"):
        export_release(tmp_path / "r", unet=(plain, unet_params), controlnet=loaded["controlnet"],
                       info=ReleaseInfo("pasd"))
    assert not (tmp_path / "r").exists()


def test_import_and_load(tiny, loaded, tmp_path):
    out = import_official(tiny, tmp_path / "imported")
    flax = load_flax_checkpoint(out)
    assert all(flax[s][0] == loaded[s][0] and _same_tree(flax[s][1], loaded[s][1]) for s in SUBS)
    via = load_checkpoint(out)
    assert all(_same_tree(via[s][1], loaded[s][1]) for s in SUBS)
    back = export_release(tmp_path / "back", unet=flax["unet"], controlnet=flax["controlnet"],
                          info=ReleaseInfo("pasd"))
    _assert_release_equals(back, tiny, bitwise=True)  # official -> Flax -> official, bit for bit
    raw = bytearray((out / "unet" / FLAX_WEIGHTS).read_bytes())
    raw[-3] ^= 1
    (out / "unet" / FLAX_WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(CacheEntryError, match="checksum"):
        load_flax_checkpoint(out)


def test_cli(tiny, tmp_path, capsys):
    out = tmp_path / "imp"
    assert convert_main(["import", "--pasd", str(tiny), "--out", str(out)]) == 0
    assert json.loads((out / "pasd_jax_checkpoint.json").read_text())["variant"] == "pasd"
    assert convert_main(["import", "--pasd", str(tiny), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["import", "--pasd", str(tiny / "unet"), "--out", str(tmp_path / "x")]) == 2
    assert "not an official PASD checkpoint" in capsys.readouterr().err
    assert convert_main(["export", "--ckpt", str(tmp_path / "no_run"), "--out", str(tmp_path / "y")]) == 2
    assert "no_run does not exist: give a train.py work dir" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert convert_main(["export", "--ckpt", str(tmp_path / "empty_run"), "--out", str(tmp_path / "y")]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert_main(["--help"])
    assert e.value.code == 0


# ------------------------------------------------------------------------------------------ bad input

def _write(path, tensors: dict) -> None:
    save_safetensors({k: np.zeros(s, np.float16) for k, s in tensors.items()}, path)


@pytest.fixture(scope="module")
def ldm_dir_golden(golden_dir):
    return golden_dir / "ldm_single_file"


SDXL_FILE = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
             "conditioner.embedders.1.model.ln_final.weight": (1280,),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}
SD2_FILE = {"cond_stage_model.model.ln_final.weight": (1024,),
            "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}


@pytest.mark.parametrize("name,tensors,pattern", [("sdxl", SDXL_FILE, r"SDXL.*conditioner.*expected a Stable "
                                                   r"Diffusion 1\.x single file"),
                                                  ("sd2", SD2_FILE, r"Stable Diffusion 2\.x.*cross-attention dim "
                                                   r"1024.*expected a Stable Diffusion 1\.x")])
def test_other_family_single_file(tmp_path, name, tensors, pattern, loaded):
    path = tmp_path / f"{name}.safetensors"
    _write(path, tensors)
    with pytest.raises(ModelFamilyError, match=pattern) as e:
        load_sd_base(path, cache=False)
    print(f"{name}: {e.value}")
    with pytest.raises(ModelFamilyError, match=pattern):
        swap_base(path, unet=loaded["unet"], cache=False)


def test_sdxl_diffusers_folder(ldm_dir_golden, tmp_path):
    unet = tmp_path / "sdxl" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                   "addition_embed_type": "text_time",
                                                   "cross_attention_dim": 2048}))
    _write(unet / WEIGHTS, {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
                            "add_embedding.linear_1.weight": (1280, 2816)})
    for comp in ("vae", "text_encoder"):
        (tmp_path / "sdxl" / comp).mkdir()
        (tmp_path / "sdxl" / comp / "config.json").write_text((ldm_dir_golden / comp / "config.json").read_text())
    with pytest.raises(ModelFamilyError, match=r"SDXL.*add_embedding.*expected a Stable Diffusion 1\.x UNet") as e:
        load_sd_base(tmp_path / "sdxl", cache=False)
    print(e.value)


def test_lora_for_another_architecture(golden_dir, loaded, tmp_path):
    sdxl = tmp_path / "sdxl_lora.safetensors"
    _write(sdxl, {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
                  "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (768, 4)})
    with pytest.raises(ModelFamilyError, match=r"SDXL.*lora_te1_") as e:
        apply_lora(sdxl, unet=loaded["unet"])
    print(e.value)
    # a LoRA trained on the other tiny SD1.x layout (16/24/32 channels) does not fit the tiny PASD UNet (32/40/40)
    with pytest.raises(LoraError, match=r"does not fit this SD1\.x model.*update") as e:
        apply_lora(golden_dir / "lora" / "lora_kohya.safetensors", unet=loaded["unet"])
    print(str(e.value)[:300])


def test_truncated_files(golden_dir, tiny, loaded, tmp_path):
    lora = golden_dir / "lora" / "lora_kohya.safetensors"
    cut = tmp_path / "lora.safetensors"
    cut.write_bytes(lora.read_bytes()[:-500])
    with pytest.raises(WeightFileError, match="truncated"):
        apply_lora(cut, unet=loaded["unet"])
    ckpt = tmp_path / "ckpt"
    for sub in SUBS:
        (ckpt / sub).mkdir(parents=True)
        (ckpt / sub / "config.json").write_text((tiny / sub / "config.json").read_text())
        raw = (tiny / sub / WEIGHTS).read_bytes()
        (ckpt / sub / WEIGHTS).write_bytes(raw if sub == "controlnet" else raw[: len(raw) // 3])
    with pytest.raises(WeightFileError, match="truncated") as e:
        import_official(ckpt, tmp_path / "out")
    print(e.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ train.py checkpoints

@pytest.fixture(scope="module")
def train_run(tiny, loaded, golden_dir, tmp_path_factory):
    """A run directory in train.py's checkpoint format whose trained part (ControlNet + PACA) is the golden tiny
    PASD checkpoint and whose frozen base points at the golden UNet folder (the SD part is read back from it)."""
    import jax.numpy as jnp

    from pasd_jax.sharding import trainable_split
    from pasd_jax.runs.checkpoint import Checkpoints, relative_base

    work = tmp_path_factory.mktemp("run")
    names = trainable_split.DEFAULT_TRAINABLE
    paca, _ = trainable_split.split_unet(loaded["unet"][1], names)
    ldm = golden_dir / "ldm_single_file"
    configs = {"unet": read_json(tiny / "unet" / "config.json"), "controlnet": read_json(tiny / "controlnet" /
                                                                                          "config.json"),
               "vae": read_json(ldm / "vae" / "config.json"), "text_encoder": read_json(ldm / "text_encoder" /
                                                                                         "config.json")}
    base = {"unet": str(tiny / "unet"), "vae": str(ldm / "vae"), "text_encoder": str(ldm / "text_encoder")}
    meta = {"config": {"model": {"variant": "pasd"}}, "model_configs": configs, "variant": "pasd",
            "base": relative_base(base, work), "trainable": list(names)}
    state = {"step": jnp.asarray(12, jnp.int32), "params": {"controlnet": loaded["controlnet"][1], "unet": paca},
             "rng": jnp.zeros(2, jnp.uint32)}
    ck = Checkpoints(work / "checkpoints")
    try:
        ck.save(state, {}, meta, wait=True)
    finally:
        ck.close()
    return work


def test_export_of_a_train_checkpoint(train_run, tiny, loaded, tmp_path, capsys):
    out = tmp_path / "release"
    assert convert_main(["export", "--ckpt", str(train_run), "--out", str(out)]) == 0
    _assert_release_equals(out, tiny, bitwise=True)  # golden -> train checkpoint -> release, bit for bit
    readme = (out / "README.md").read_text()
    print(readme)
    assert "training step: 12" in readme and "`pasd`" in readme and str(tiny / "unet") in readme
    assert "`pixel_attentions`, `norm2_plus`, `attn2_plus`, `proj_in_plus`" in readme
    back = load_checkpoint(out, cache=False)
    assert all(_same_tree(back[s][1], loaded[s][1]) for s in SUBS)
    assert convert_main(["export", "--ckpt", str(train_run), "--out", str(out)]) == 2  # refused before reading
    assert "already exists" in capsys.readouterr().err


def _tree_bytes(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_writes_over_its_run(train_run, tmp_path, capsys):
    """Issue 13.1: `export --ckpt RUN --out RUN --overwrite` deleted the whole run and exited 0."""
    before = _tree_bytes(train_run)
    link = tmp_path / "link_to_run"
    link.symlink_to(train_run)
    for out in (train_run, train_run / "release", train_run / "checkpoints", train_run.parent, link):
        assert convert_main(["export", "--ckpt", str(train_run), "--out", str(out), "--overwrite"]) == 2, out
        err = capsys.readouterr().err
        print(out, "->", err.strip())
        assert "could destroy the input" in err and "choose an output folder outside it" in err
    assert _tree_bytes(train_run) == before  # every checkpoint, metric and event file is still there, unchanged


def test_import_never_writes_over_its_source(tiny, tmp_path, capsys):
    src = tmp_path / "official"
    shutil.copytree(tiny, src)
    before = _tree_bytes(src)
    for out in (src, src / "unet", src / "flax", tmp_path):
        assert convert_main(["import", "--pasd", str(src), "--out", str(out), "--overwrite"]) == 2, out
        assert "could destroy the input" in capsys.readouterr().err
    assert _tree_bytes(src) == before


def test_staged_write_guard_covers_every_caller(loaded, tmp_path):
    from pasd_jax.safe_write import staged_write

    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(b"precious")
    with pytest.raises(OutputPathError, match="is the input"):
        staged_write(src, lambda tmp: None, inputs=[src], overwrite=True)
    with pytest.raises(OutputPathError, match="lies inside the input"):
        export_release(src / "rel", unet=loaded["unet"], controlnet=loaded["controlnet"],
                       info=ReleaseInfo("pasd"), overwrite=True, inputs=[src])
    assert (src / "data.bin").read_bytes() == b"precious"
