"""SD1.x base loading into Flax (issue 6, item 1): diffusers folder and LDM single file give the same trees."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from pasd_jax.convert.base import COMPONENTS, load_sd_base, weight_file_shapes
from pasd_jax.convert.cache import ConversionCache
from pasd_jax.convert.folders import style_of
from pasd_jax.convert.io import WeightFileError, load_safetensors, save_safetensors
from pasd_jax.convert.ldm import ASSETS_SD15, LdmConversionError
from pasd_jax.convert.tree import flax_to_torch
from pasd_jax.models.blocks import PLAIN

FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
         "text_encoder": "text_encoder/model.safetensors"}
COUNTS = {"unet": 496, "vae": 248, "text_encoder": 36}


@pytest.fixture(scope="module")
def ldm_dir(golden_dir):
    return golden_dir / "ldm_single_file"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ConversionCache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def golden_state(ldm_dir):
    return {c: load_safetensors(ldm_dir / f) for c, f in FILES.items()}


@pytest.fixture(scope="module")
def ldm_state(ldm_dir):
    return load_safetensors(ldm_dir / "model.safetensors")


def _assert_component_bitwise(model, ref: dict, comp: str, label: str) -> None:
    got = flax_to_torch(model[1], style=style_of(comp))
    assert set(got) == set(ref), f"{label} {comp}: key sets differ"
    worst = max(float(np.abs(got[k].astype(np.float64) - ref[k]).max()) for k in ref)
    same = sum(got[k].tobytes() == ref[k].tobytes() for k in ref)
    print(f"{label} {comp}: {same}/{len(ref)} tensors bit-equal, max abs err {worst}")
    assert same == len(ref) == COUNTS[comp]


def test_diffusers_folder(ldm_dir, cache, golden_state):
    base = load_sd_base(ldm_dir, cache=cache)
    for comp in COMPONENTS:
        _assert_component_bitwise(getattr(base, comp), golden_state[comp], comp, "folder")
    assert base.unet[0].variant == PLAIN
    assert base.scheduler_config == ldm_dir / "scheduler" / "scheduler_config.json"
    assert base.tokenizer_dir == ASSETS_SD15 / "tokenizer"  # the folder has none: the shipped SD1.5 one
    assert base.ignored == ()


def test_single_file_equals_the_folder(ldm_dir, cache, golden_state):
    base = load_sd_base(ldm_dir / "model.safetensors", base=ldm_dir, cache=cache)
    for comp in COMPONENTS:
        _assert_component_bitwise(getattr(base, comp), golden_state[comp], comp, "single file")
    assert base.source == ldm_dir / "model.safetensors"


def test_component_folder_mapping(ldm_dir, cache, golden_state):
    """The form a train.py checkpoint records its frozen base in: {component: folder}."""
    folders = {c: str(ldm_dir / c) for c in ("vae", "text_encoder")}
    base = load_sd_base(folders, components=tuple(folders), cache=cache)
    for comp in folders:
        _assert_component_bitwise(getattr(base, comp), golden_state[comp], comp, "mapping")
    assert base.unet is None and base.source == ldm_dir
    assert base.scheduler_config == ldm_dir / "scheduler" / "scheduler_config.json"
    with pytest.raises(WeightFileError, match=r"lack \['unet'\]"):
        load_sd_base(folders, cache=cache)


def test_components_and_dtypes(ldm_dir, cache, golden_state):
    import jax.numpy as jnp

    base = load_sd_base(ldm_dir, components=("vae",), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, cache=cache)
    assert base.unet is None and base.text_encoder is None
    module, params = base.vae
    assert module.param_dtype == jnp.bfloat16
    got = flax_to_torch(params, dtype=None)
    k = "encoder.conv_in.weight"
    assert got[k].dtype == jnp.bfloat16
    assert np.array_equal(got[k], golden_state["vae"][k].astype(jnp.bfloat16))


def test_non_weight_keys_are_ignored_and_reported(ldm_dir, ldm_state, cache, golden_state, tmp_path, caplog):
    extras = {"cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
              "model_ema.decay": np.array(0.9999, np.float32), "betas": np.zeros(1000, np.float32),
              "alphas_cumprod": np.zeros(1000, np.float32), "model_ema.num_updates": np.array(7, np.int32)}
    path = tmp_path / "civitai.safetensors"
    save_safetensors({**ldm_state, **extras}, path)
    with caplog.at_level(logging.INFO, logger="pasd_jax.convert"):
        base = load_sd_base(path, base=ldm_dir, cache=cache)
    print("ignored:", base.ignored)
    assert base.ignored == tuple(sorted(extras))
    assert any("ignored 5 non-weight key(s)" in r.getMessage() for r in caplog.records)
    _assert_component_bitwise(base.unet, golden_state["unet"], "unet", "with extras")


def test_unknown_key_is_an_error(ldm_dir, ldm_state, tmp_path):
    extra = "model.diffusion_model.output_blocks.2.2.conv.weight"
    path = tmp_path / "odd.safetensors"
    save_safetensors({**ldm_state, extra: np.zeros((4, 4), np.float32)}, path)
    with pytest.raises(LdmConversionError) as e:
        load_sd_base(path, base=ldm_dir, components=("unet",), cache=False)
    print(e.value)
    assert extra in str(e.value)


def test_pruned_file_takes_vae_from_base_or_says_so(ldm_dir, ldm_state, cache, golden_state, tmp_path):
    path = tmp_path / "pruned.safetensors"
    save_safetensors({k: v for k, v in ldm_state.items() if not k.startswith("first_stage_model.")}, path)
    base = load_sd_base(path, base=ldm_dir, cache=cache)
    _assert_component_bitwise(base.vae, golden_state["vae"], "vae", "pruned file + --base")
    only_configs = tmp_path / "configs"
    for comp in ("unet", "text_encoder"):
        shutil.copytree(ldm_dir / comp, only_configs / comp)
    (only_configs / "vae").mkdir()
    shutil.copy(ldm_dir / "vae" / "config.json", only_configs / "vae" / "config.json")
    with pytest.raises(WeightFileError, match="no weight file"):
        load_sd_base(path, base=only_configs, components=("vae",), cache=False)
    with pytest.raises(WeightFileError, match=r"holds no vae weights.*--base") as e:
        load_sd_base(path, cache=False)  # no --base: said before any conversion
    print(e.value)


def test_folder_missing_a_component(ldm_dir, tmp_path):
    shutil.copytree(ldm_dir / "unet", tmp_path / "unet")
    with pytest.raises(WeightFileError, match=r"missing \S*/vae/config.json") as e:
        load_sd_base(tmp_path, cache=False)
    print(e.value)


def test_pasd_unet_is_not_a_base(golden_dir, tmp_path):
    shutil.copytree(golden_dir / "tiny_pasd" / "unet", tmp_path / "unet")
    with pytest.raises(WeightFileError, match="PASD UNet") as e:
        load_sd_base(tmp_path, components=("unet",), cache=False)
    print(e.value)


def test_truncated_file_is_refused_from_the_header(ldm_dir, tmp_path):
    raw = (ldm_dir / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(WeightFileError, match="truncated") as e:
        load_sd_base(bad, base=ldm_dir, cache=False)
    print(e.value)
    assert len(weight_file_shapes(ldm_dir / "model.safetensors")) == 780


def test_missing_path(tmp_path):
    with pytest.raises(WeightFileError, match="does not exist"):
        load_sd_base(tmp_path / "nope", cache=False)


@pytest.mark.torch
def test_bin_folder_and_ckpt_file(ldm_dir, ldm_state, golden_state, tmp_path):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "bin"
    for comp, rel in FILES.items():
        (folder / comp).mkdir(parents=True)
        shutil.copy(ldm_dir / comp / "config.json", folder / comp / "config.json")
        name = "pytorch_model.bin" if comp == "text_encoder" else "diffusion_pytorch_model.bin"
        torch.save({k: torch.from_numpy(v.copy()) for k, v in golden_state[comp].items()}, folder / comp / name)
    base = load_sd_base(folder, cache=False)
    for comp in COMPONENTS:
        _assert_component_bitwise(getattr(base, comp), golden_state[comp], comp, ".bin folder")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in ldm_state.items()}}, ckpt)
    base = load_sd_base(ckpt, base=ldm_dir, cache=False)
    for comp in COMPONENTS:
        _assert_component_bitwise(getattr(base, comp), golden_state[comp], comp, ".ckpt")
