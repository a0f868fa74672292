"""Issue 2 acceptance at full SD1.5 size without memory: abstract trees vs the official key/shape manifests, and the
SD part of the UNet tree vs diffusers 0.39's FlaxUNet2DConditionModel (shapes only)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from pasd_jax.convert import abstract_params, build_module
from pasd_jax.convert.tree import expected_torch_shapes
from pasd_jax.models.config import controlnet_config_from_unet


def _manifest(path):
    return {k: tuple(v["shape"]) for k, v in json.loads(path.read_text()).items()}


@pytest.fixture(scope="module")
def sd15_unet_config(shared_dir):
    return json.loads((shared_dir / "sd15_configs" / "unet" / "config.json").read_text())


def test_pasd_unet_matches_manifest(golden_dir, sd15_unet_config):
    manifest = _manifest(golden_dir / "manifest_sd15" / "pasd_unet_sd15_manifest.json")
    unet = build_module("unet", sd15_unet_config, variant="pasd")
    ours = expected_torch_shapes(abstract_params(unet))
    print(f"\nPASD UNet: {len(ours)} tensors ours, {len(manifest)} official")
    assert len(manifest) == 998
    assert ours == manifest


def test_pasd_controlnet_matches_manifest(golden_dir, sd15_unet_config):
    manifest = _manifest(golden_dir / "manifest_sd15" / "pasd_controlnet_sd15_manifest.json")
    cn = build_module("controlnet", controlnet_config_from_unet(sd15_unet_config))
    ours = expected_torch_shapes(abstract_params(cn))
    print(f"\nPASD ControlNet: {len(ours)} tensors ours, {len(manifest)} official")
    assert len(manifest) == 346
    assert ours == manifest


def test_pasd_specific_keys_are_exactly_the_paca_layers(golden_dir, sd15_unet_config):
    specific = json.loads((golden_dir / "manifest_sd15" / "pasd_specific_keys.json").read_text())
    plain = set(expected_torch_shapes(abstract_params(build_module("unet", sd15_unet_config, variant="sd"))))
    pasd = set(expected_torch_shapes(abstract_params(build_module("unet", sd15_unet_config, variant="pasd"))))
    assert len(plain) == 686
    assert pasd - plain == {k for k in pasd if ".pixel_attentions." in k}
    assert set(specific["unet"]) == pasd - plain
    assert set(specific["controlnet"]) == {k for k in _manifest(
        golden_dir / "manifest_sd15" / "pasd_controlnet_sd15_manifest.json") if ".to_rgbs." in k}


def test_parameter_counts_at_sd15_size(sd15_unet_config):
    """Spec 3.2-3.4: PASD UNet 1,107,755,524; pasd_light 888,218,884 in 767 tensors; ControlNet 361,289,497."""
    def count(module):
        leaves = jax.tree_util.tree_leaves(abstract_params(module))
        return len(leaves), sum(int(np.prod(x.shape)) for x in leaves)

    assert count(build_module("unet", sd15_unet_config, variant="pasd")) == (998, 1_107_755_524)
    assert count(build_module("unet", sd15_unet_config, variant="pasd_light")) == (767, 888_218_884)
    assert count(build_module("controlnet", controlnet_config_from_unet(sd15_unet_config))) == (346, 361_289_497)
    rrdb = build_module("controlnet", controlnet_config_from_unet(sd15_unet_config, use_rrdb=True))
    assert count(rrdb) == (406, 361_289_497 + 207_840)


def test_sd_part_equals_diffusers_flax_unet(sd15_unet_config):
    import diffusers  # test extra: diffusers==0.39.0, the last release with Flax models (shapes only)

    ref_model = diffusers.FlaxUNet2DConditionModel.from_config(sd15_unet_config)
    ref = jax.eval_shape(lambda r: ref_model.init_weights(r), jax.random.PRNGKey(0))
    ref_flat = {k: tuple(v.shape) for k, v in flatten_dict(ref).items()}
    ours = build_module("unet", sd15_unet_config, variant="pasd")
    ours_flat = {k: tuple(v.shape) for k, v in flatten_dict(abstract_params(ours)).items()
                 if not any(p.startswith("pixel_attentions_") for p in k)}
    print(f"\ndiffusers {diffusers.__version__}: {len(ref_flat)} leaves; ours (SD part): {len(ours_flat)}")
    assert ours_flat == ref_flat
