"""Flax ResNet-50 + torchvision converter + preprocessing against `golden/resnet50` (torchvision, fp32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pasd_jax.convert.io import WeightFileError, load_safetensors
from pasd_jax.convert.torchvision_resnet import convert_resnet50, infer_width_per_group, load_torchvision_resnet50
from pasd_jax.models.resnet import ResNet50
from pasd_jax.prompts.preprocess import center_crop, imagenet_preprocess, resize_short_side


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_safetensors(golden_dir / "resnet50" / "inputs_outputs.safetensors")


@pytest.fixture(scope="module")
def state_dict(golden_dir):
    return load_safetensors(golden_dir / "resnet50" / "resnet50.safetensors")


@pytest.fixture(scope="module")
def forward(golden_dir, golden):
    model, variables = load_torchvision_resnet50(golden_dir / "resnet50" / "resnet50.safetensors")
    assert model.width_per_group == 8
    fn = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))
    logits, state = fn(variables, jnp.asarray(golden["pixel_values"]))
    return np.asarray(logits), jax.tree_util.tree_map(np.asarray, state["intermediates"])


def test_logits_and_top5_match_golden(forward, golden):
    logits, _ = forward
    err = np.abs(logits - golden["logits"]).max()
    top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    gaps = np.sort(logits, axis=-1)[:, -1] - np.sort(logits, axis=-1)[:, -2]
    print(f"logits max abs err {err:.3e}; top-1/top-2 logit gaps {gaps} (baby's is the close call)")
    # Measured 2.0e-6 (|logit| <= 2.8); our float64 evaluation is 1.8e-6 from the golden
    # (tools/tolerances/measure_f64.py). 1e-4 is what the golden README asks for and keeps baby's 0.0019 gap.
    assert err <= 1e-4
    np.testing.assert_array_equal(top5, golden["top5_indices"])
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    p_err = np.abs(np.take_along_axis(probs, golden["top5_indices"], -1) - golden["top5_probs"]).max()
    print(f"top-5 probability max abs err {p_err:.3e}")
    # Measured 1.0e-8 (probabilities <= 0.012); float64 vs the golden 7.4e-9. Was 1e-6 (100x), now 5e-8.
    assert p_err <= 5e-8


def test_intermediate_features_match_golden(forward, golden):
    _, inter = forward
    nhwc_to_nchw = (0, 3, 1, 2)
    pairs = {
        "stem_out_img0": inter["stem"][0][:1].transpose(nhwc_to_nchw),
        "layer1_out_channel_mean": inter["layer1"][0].mean(axis=(1, 2)),
        "layer2_out_channel_mean": inter["layer2"][0].mean(axis=(1, 2)),
        "layer3_out_channel_mean": inter["layer3"][0].mean(axis=(1, 2)),
        "layer4_out": inter["layer4"][0].transpose(nhwc_to_nchw),
        "pooled": inter["pooled"][0],
    }
    for name, ours in pairs.items():
        ref = golden[name]
        assert ours.shape == ref.shape, name
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        print(f"{name}: max abs err / max |golden| = {rel:.3e}")
        # Measured at most 1.6e-6 (layer4_out); float64 vs the golden 7.9e-7 relative (measure_f64.py)
        assert rel <= 1e-5, name


@pytest.mark.parametrize("index,name", [(0, "baby"), (1, "bird")])
def test_preprocessing_reproduces_golden_pixel_values(shared_dir, golden, index, name):
    image = Image.open(shared_dir / "examples" / "Set5" / f"{name}.png").convert("RGB")
    x = imagenet_preprocess(image)
    err = np.abs(x - golden["pixel_values"][index]).max()
    print(f"{name}: pixel_values max abs err {err:.3e}")
    assert x.dtype == np.float32 and x.shape == (3, 224, 224)
    # Measured 0 (bit-equal) for both images; 1e-6 is ~4 float32 ulps of |x| <= 2.6, room for another evaluation
    # order of (x / 255 - mean) / std.
    assert err <= 1e-6


def test_resize_and_crop_follow_torchvision_rounding():
    # long side floored: 232 * 333 / 250 = 309.02 -> 309; portrait keeps the short side horizontal
    assert resize_short_side(Image.new("RGB", (333, 250))).size == (309, 232)
    assert resize_short_side(Image.new("RGB", (250, 333))).size == (232, 309)
    assert resize_short_side(Image.new("RGB", (100, 50))).size == (464, 232)
    # crop offsets use Python's round (half to even): (235 - 224) / 2 = 5.5 -> 6, (233 - 224) / 2 = 4.5 -> 4
    img = Image.fromarray(np.arange(235 * 233, dtype=np.uint32).reshape(233, 235).astype(np.int32), mode="I")
    crop = np.asarray(center_crop(img))
    assert crop.shape == (224, 224)
    assert crop[0, 0] == 4 * 235 + 6


def test_converter_infers_width_and_real_resnet50_size(state_dict):
    assert infer_width_per_group(state_dict) == 8
    with pytest.raises(WeightFileError, match="width_per_group=64 requested but the weights have 8"):
        convert_resnet50(state_dict, width_per_group=64)
    # The real model's trainable parameter count as torchvision reports it (25,557,032).
    shapes = jax.eval_shape(ResNet50(width_per_group=64).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 3, 224, 224)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert n == 25_557_032


def test_converter_lists_every_bad_key(state_dict):
    bad = dict(state_dict)
    del bad["layer3.2.bn2.running_var"]
    bad["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
    bad["layer2.1.conv2.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    with pytest.raises(WeightFileError) as e:
        convert_resnet50(bad)
    msg = str(e.value)
    print(msg)
    assert "1 missing: layer3.2.bn2.running_var" in msg
    assert "1 unexpected: layer9.0.conv1.weight" in msg
    assert "1 mis-shaped: layer2.1.conv2.weight: file (16, 16, 1, 1), expected (16, 16, 3, 3)" in msg
    assert "num_batches_tracked" not in msg  # eval mode ignores them
