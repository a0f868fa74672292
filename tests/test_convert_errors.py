"""Issue 2 acceptance: bad checkpoints give errors that name the problem (never a silent partial load)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pasd_jax.convert import CheckpointMismatchError, WeightFileError, from_pytorch, load_pasd_checkpoint
from pasd_jax.convert.io import load_safetensors, save_safetensors
from pasd_jax.errors import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def unet_copy(golden_dir, tmp_path):
    dst = tmp_path / "unet"
    shutil.copytree(golden_dir / "tiny_pasd" / "unet", dst)
    return dst


def _edit(folder, fn):
    state = load_safetensors(folder / WEIGHTS)
    fn(state)
    save_safetensors(state, folder / WEIGHTS)


def test_missing_key_is_listed(unet_copy):
    key = "up_blocks.1.pixel_attentions.0.transformer_blocks.0.attn2.to_k.weight"
    _edit(unet_copy, lambda s: s.pop(key))
    with pytest.raises(CheckpointMismatchError, match="missing keys") as e:
        from_pytorch(unet_copy)
    assert key in str(e.value)
    print("\n" + str(e.value))


def test_unexpected_key_is_listed(unet_copy):
    _edit(unet_copy, lambda s: s.__setitem__("up_blocks.0.extra_layer.weight", np.zeros((3,), np.float32)))
    with pytest.raises(CheckpointMismatchError, match="unexpected keys") as e:
        from_pytorch(unet_copy)
    assert "up_blocks.0.extra_layer.weight" in str(e.value)


def test_wrong_shape_is_listed(unet_copy):
    key = "conv_in.weight"
    _edit(unet_copy, lambda s: s.__setitem__(key, np.zeros((32, 4, 1, 1), np.float32)))
    with pytest.raises(CheckpointMismatchError, match="shape mismatches") as e:
        from_pytorch(unet_copy)
    assert "conv_in.weight: checkpoint (32, 4, 1, 1), model expects (32, 4, 3, 3)" in str(e.value)


def test_truncated_safetensors(unet_copy):
    data = (unet_copy / WEIGHTS).read_bytes()
    (unet_copy / WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightFileError, match="truncated"):
        from_pytorch(unet_copy)


def test_unknown_model_type(unet_copy):
    cfg = json.loads((unet_copy / "config.json").read_text())
    cfg["_class_name"] = "UNet3DConditionModel"
    (unet_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model type.*UNet3DConditionModel"):
        from_pytorch(unet_copy)


def test_unsupported_config_option(unet_copy):
    cfg = json.loads((unet_copy / "config.json").read_text())
    cfg["addition_embed_type"] = "text_time"  # SDXL
    (unet_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="addition_embed_type"):
        from_pytorch(unet_copy)


def test_missing_folder_and_files(tmp_path, golden_dir):
    with pytest.raises(WeightFileError, match="does not exist"):
        from_pytorch(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightFileError, match="no config.json"):
        from_pytorch(tmp_path / "empty")
    with pytest.raises(WeightFileError, match="holds the model folders"):
        from_pytorch(golden_dir / "tiny_pasd")
    half = tmp_path / "half"
    shutil.copytree(golden_dir / "tiny_pasd" / "unet", half / "unet")
    with pytest.raises(WeightFileError, match="missing the controlnet/ folder"):
        load_pasd_checkpoint(half)
    (half / "unet" / WEIGHTS).unlink()
    with pytest.raises(WeightFileError, match="no weight file"):
        from_pytorch(half / "unet")


def test_rrdb_config_and_weights_disagree(golden_dir, tmp_path):
    dst = tmp_path / "controlnet"
    shutil.copytree(golden_dir / "tiny_pasd_rrdb" / "controlnet", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["use_rrdb"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightFileError, match="use_rrdb=False"):
        from_pytorch(dst)
