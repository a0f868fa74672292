"""`load_for_sampling` with a personalized base and a LoRA: the params it serves are exactly what the convert
functions give, and they change the sampled image."""
from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from pasd_jax.convert.blend import is_paca_key
from pasd_jax.convert.io import load_safetensors, save_safetensors
from pasd_jax.convert.personalize import apply_lora, swap_base
from pasd_jax.sampling import PASDPipeline, SamplingOptions, load_for_sampling


def _same(a, b) -> bool:
    fa, fb = flatten_dict(a), flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


@pytest.fixture(scope="module")
def plain(golden_dir):
    return load_for_sampling(golden_dir / "tiny_pasd", base=golden_dir / "tiny_pipeline", cache=False)


@pytest.fixture(scope="module")
def personal_unet(golden_dir, tmp_path_factory):
    """A personalized SD UNet folder of the tiny layout: the SD (non-PACA) weights of tiny_pasd, perturbed."""
    src = golden_dir / "tiny_pasd" / "unet"
    out = tmp_path_factory.mktemp("personal") / "unet"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    rng = np.random.default_rng(7)
    tensors = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
               for k, v in load_safetensors(src / "diffusion_pytorch_model.safetensors").items() if not is_paca_key(k)}
    save_safetensors(tensors, out / "diffusion_pytorch_model.safetensors")
    return out


def _sample(loaded) -> np.ndarray:
    pipe = PASDPipeline(loaded.models, loaded.params, loaded.scheduler_config, loaded.tokenizer_dir)
    img = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    return pipe.sample(img, ["a photo"], [""], jax.random.PRNGKey(0)[None], SamplingOptions(steps=2))


def test_personalized_params_are_the_swap(golden_dir, plain, personal_unet):
    got = load_for_sampling(golden_dir / "tiny_pasd", base=golden_dir / "tiny_pipeline", personalized=personal_unet,
                            cache=False)
    m, p = plain.models, plain.params
    want = swap_base(personal_unet, unet=(m.unet, p["unet"]), vae=(m.vae, p["vae"]),
                     text_encoder=(m.text_encoder, p["text_encoder"]), cache=False)
    assert _same(got.params["unet"], want.unet) and not _same(got.params["unet"], p["unet"])
    assert _same(got.params["controlnet"], p["controlnet"])  # the ControlNet is never touched
    paca = {k: v for k, v in flatten_dict(p["unet"]).items() if any("pixel_attentions" in str(s) for s in k)}
    assert paca and all(np.array_equal(flatten_dict(got.params["unet"])[k], v) for k, v in paca.items())
    diff = np.abs(_sample(got).astype(int) - _sample(plain).astype(int)).max()
    print(f"personalized vs plain output: max |diff| {diff} levels")
    assert diff > 0         # measured 94 levels: the swapped weights reach the image (same program, same key)


def test_lora_params_are_the_merge(golden_dir, plain):
    lora = golden_dir / "tiny_pipeline_lcm" / "lcm_lora" / "pytorch_lora_weights.safetensors"
    got = load_for_sampling(golden_dir / "tiny_pasd", base=golden_dir / "tiny_pipeline", lora=lora,
                            lora_multiplier=0.6, cache=False)
    m, p = plain.models, plain.params
    want = apply_lora(lora, unet=(m.unet, p["unet"]), text_encoder=(m.text_encoder, p["text_encoder"]),
                      multiplier=0.6)
    assert _same(got.params["unet"], want.unet) and not _same(got.params["unet"], p["unet"])
    diff = np.abs(_sample(got).astype(int) - _sample(plain).astype(int)).max()
    print(f"LoRA vs plain output: max |diff| {diff} levels")
    assert diff > 0         # measured 20 levels: the merged LoRA reaches the image (same program, same key)
