"""Issue 2 acceptance: to_pytorch(from_pytorch(x)) reproduces every tensor (and the config) bit for bit."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pasd_jax.convert import from_pytorch, to_pytorch
from pasd_jax.convert.io import find_weight_file, load_safetensors, safetensors_metadata

FOLDERS = ["tiny_pasd/unet", "tiny_pasd/controlnet", "tiny_pasd_light/unet", "tiny_pasd_rrdb/controlnet",
           "tiny_pipeline/vae", "tiny_pipeline/text_encoder"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_round_trip_bit_for_bit(golden_dir, tmp_path, folder):
    src = golden_dir / folder
    module, params = from_pytorch(src)
    written = to_pytorch(module, params, tmp_path / "out")
    original = load_safetensors(find_weight_file(src, ("diffusion_pytorch_model", "model")))
    back = load_safetensors(written)
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert safetensors_metadata(written).get("format") == "pt"
    print(f"\n{folder}: {len(original)} tensors identical")
