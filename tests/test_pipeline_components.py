"""Issue 2 acceptance: text encoder and VAE against the official tiny pipeline golden (max abs err <= 1e-4)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from pasd_jax.convert import from_pytorch
from pasd_jax.convert.io import load_safetensors
from pasd_jax.models.vae import sample_posterior

# Measured: text embeddings 1.6e-6 (|emb| <= 3.7), VAE outputs up to 1.8e-6 (decode, |x| <= 1.5). The golden's own
# float32 error, our modules in float64 vs the golden (tools/tolerances/measure_f64.py): 1.2e-6 and 9.9e-7. 1e-4
# is ~55x the measure, the float32 port tolerance the golden README suggests.
TOL = 1e-4


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_safetensors(golden_dir / "tiny_pipeline" / "pipeline_ddim.safetensors")


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_text_encoder_embeddings(golden_dir, golden):
    te, params = from_pytorch(golden_dir / "tiny_pipeline" / "text_encoder")
    fn = jax.jit(lambda p, ids: te.apply({"params": p}, ids))
    for ids, emb in (("prompt_input_ids", "prompt_embeds"), ("negative_prompt_input_ids", "negative_prompt_embeds")):
        err = _err(fn(params, golden[ids]), golden[emb])
        print(f"\n{emb}: max abs err {err:.2e}")
        assert err <= TOL


def test_vae_posterior_sample_and_decode(golden_dir, golden):
    vae, params = from_pytorch(golden_dir / "tiny_pipeline" / "vae")
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params,
                                                                                          golden["vae_encode_input"])
    z = vae.config.scaling_factor * sample_posterior(mean, logvar, golden["random_draw.0"])
    image = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, golden["vae_decode_input"])
    errors = {"posterior_mean": _err(mean, golden["vae_posterior_mean"]),
              "posterior_logvar": _err(logvar, golden["vae_posterior_logvar"]),
              "sampled_latent": _err(z, golden["add_noise.0.original"]),
              "decode": _err(image, golden["vae_decode_output"])}
    print("\nVAE: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert max(errors.values()) <= TOL, errors
