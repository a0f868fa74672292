"""The CFG step's text-independent prefix runs once per image (`models.shared_batch`) and changes nothing.

Reference: the same ControlNet + UNet call on inputs repeated per prompt (the official torch.cat([x] * 2)). Both
PASD variants (pasd_light reads the ControlNet map in its text transformers), one and two images, a ControlNet
output left at the image batch (the first zero conv) feeding the UNet's skips and its top PACA layer.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.convert import build_module
from pasd_jax.models.config import controlnet_config_from_unet
from pasd_jax.models.host_init import host_params
from pasd_jax.models.shared_batch import common_batch, to_batch
from pasd_jax.sampling.denoise import make_guided_eps

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_to_batch_repeats_each_row_in_place():
    x = jnp.arange(3)[:, None] * jnp.ones((3, 2))
    np.testing.assert_array_equal(np.asarray(to_batch(x, 6))[:, 0], [0, 0, 1, 1, 2, 2])
    assert to_batch(x, 3) is x
    a, b = common_batch(x, jnp.zeros((6, 2)))
    assert a.shape == b.shape == (6, 2)
    with pytest.raises(ValueError, match="cannot share a batch of 3 rows across 4"):
        to_batch(x, 4)


@pytest.mark.parametrize("variant", ["pasd", "pasd_light"])
@pytest.mark.parametrize("n", [1, 2])
def test_shared_prefix_matches_the_repeated_batch(variant, n):
    ucfg = json.loads((REPO / "pasd_jax" / "assets" / "tiny" / "unet" / "config.json").read_text())
    unet = build_module("unet", ucfg, variant=variant)
    cn = build_module("controlnet", controlnet_config_from_unet(ucfg))
    params = {"unet": host_params(unet, 0, stream="unet"), "controlnet": host_params(cn, 0, stream="controlnet")}
    # the zero convs start at zero: give them weights, or the residual path (and its batch) is not exercised
    rng = np.random.default_rng(0)
    params["controlnet"] = jax.tree_util.tree_map_with_path(
        lambda p, v: rng.normal(0, 0.05, v.shape).astype(np.float32)
        if any("controlnet_" in str(k) or "conv_out" in str(k) for k in p) else v, params["controlnet"])
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    lat = 16
    z = jax.random.normal(k[0], (n, 4, lat, lat))
    ctx = jax.random.normal(k[1], (n, 2, 77, ucfg["cross_attention_dim"]))
    cond = jax.random.uniform(k[2], (n, 3, 8 * lat, 8 * lat))
    eps_fn = jax.jit(make_guided_eps(unet, cn))
    t, s = jnp.int32(400), jnp.float32(0.8)
    # guidance 0 and 1 give each prompt's own estimate (no amplification of rounding by the guidance scale)
    shared = jnp.stack([eps_fn(params, z, t, ctx, cond, jnp.float32(w), s) for w in (0.0, 1.0)], axis=1)
    # the reference: each image twice, one prompt per row, as the official torch.cat([x] * 2)
    one_each = eps_fn(params, jnp.repeat(z, 2, 0), t, ctx.reshape(2 * n, 1, 77, -1), jnp.repeat(cond, 2, 0),
                      jnp.float32(1.0), s).reshape(n, 2, 4, lat, lat)
    err = float(jnp.abs(shared - one_each).max())
    print(f"\n{variant}, {n} image(s): max |shared - repeated| = {err:.2e} (max |eps| "
          f"{float(jnp.abs(one_each).max()):.2f})")
    assert shared.shape == (n, 2, 4, lat, lat)
    assert err <= 1e-5  # measured 0.9e-6 to 1.1e-6: fp32 rounding of two differently fused programs
    # the two prompts still differ: the repeat happens before the text, not after the models
    assert float(jnp.abs(one_each[:, 0] - one_each[:, 1]).max()) > 1e-3
