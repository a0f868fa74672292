"""Host-side random init: the same tree as `module.init`, each tensor from its module's own distribution."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from configs import tiny
from pasd_jax.models.host_init import host_params
from pasd_jax.train import setup
from pasd_jax.sharding import trainable_split
from pasd_jax.runs.models import abstract, build_models


@pytest.fixture(scope="module")
def models():
    c = tiny.get_config()
    c.model.use_rrdb = True
    return build_models(setup.model_config_dicts(c.model), c.model.variant)


def test_tree_matches_init_and_is_reproducible(models):
    for kind in ("unet", "controlnet", "vae", "text_encoder"):
        module = getattr(models, kind)
        got = trainable_split.flatten(host_params(module, 7, stream=kind))
        want = trainable_split.flatten(abstract(module))
        assert got.keys() == want.keys(), kind
        assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in got), kind
        again = trainable_split.flatten(host_params(module, 7, stream=kind))
        assert all(np.array_equal(got[k], again[k]) for k in got)
    a = trainable_split.flatten(host_params(models.unet, 7, stream="unet"))
    b = trainable_split.flatten(host_params(models.unet, 8, stream="unet"))
    c = trainable_split.flatten(host_params(models.unet, 7, stream="vae"))
    k = "conv_in/kernel"
    assert not np.array_equal(a[k], b[k]) and not np.array_equal(a[k], c[k])


def test_distributions_are_the_modules_own(models):
    unet = trainable_split.flatten(host_params(models.unet, 0, stream="unet"))
    cn = trainable_split.flatten(host_params(models.controlnet, 0, stream="controlnet"))
    text = trainable_split.flatten(host_params(models.text_encoder, 0, stream="text_encoder"))
    # PyTorch default Linear/Conv: U(+-1/sqrt(fan_in)) for kernel and bias
    q = unet["up_blocks_1/pixel_attentions_0/transformer_blocks_0/attn1/to_q/kernel"]
    bound = 1 / math.sqrt(q.shape[0])
    assert np.abs(q).max() <= bound and np.abs(q).max() > 0.9 * bound
    conv = unet["conv_in/kernel"]
    bound = 1 / math.sqrt(np.prod(conv.shape[:3]))
    assert np.abs(conv).max() <= bound and abs(float(conv.std()) - bound / math.sqrt(3)) < 0.2 * bound
    # zero convs, norms
    assert not np.any(cn["controlnet_mid_block/kernel"]) and not np.any(cn["controlnet_down_blocks_0/bias"])
    norms = [k for k in unet if "/norm" in k]
    assert norms and all(np.all(unet[k] == (1 if k.endswith("scale") else 0)) for k in norms)
    # CLIP embeddings N(0, 0.02^2)
    emb = text["text_model/embeddings/token_embedding/embedding"]
    assert abs(float(emb.std()) - 0.02) < 0.002 and abs(float(emb.mean())) < 0.002
    # RRDB convs: kaiming normal x 0.1, zero bias
    rrdb = [k for k in cn if "preprocesser_0" in k and k.endswith("conv1/kernel")]
    assert rrdb, "the RRDB preprocessor should be in this controlnet"
    w = cn[rrdb[0]]
    std = 0.1 * math.sqrt(2 / np.prod(w.shape[:3]))
    assert abs(float(w.std()) - std) < 0.25 * std


def test_remat_modules_keep_their_paths():
    c = tiny.get_config()
    remat = build_models(setup.model_config_dicts(c.model), c.model.variant, remat=True)
    for kind in ("unet", "controlnet"):
        module = getattr(remat, kind)
        got = trainable_split.flatten(host_params(module, 0, stream=kind))
        assert got.keys() == trainable_split.flatten(abstract(module)).keys(), kind


def test_same_distributions_as_jax_init(models):
    """The jitted `module.init` and the host draw agree in distribution (mean/std per tensor, loosely)."""
    module = models.text_encoder
    jax_p = trainable_split.flatten(jax.jit(lambda k: module.init(k, *module.dummy_inputs())["params"])(
        jax.random.key(0)))
    host_p = trainable_split.flatten(host_params(module, 0, stream="text_encoder"))
    for k, v in jax_p.items():
        v, h = np.asarray(v), host_p[k]
        if v.size < 512:
            continue
        assert abs(float(v.std()) - float(h.std())) <= 0.1 * float(v.std()) + 1e-12, k
