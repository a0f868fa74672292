"""Issue 2 acceptance: the Flax PASD ControlNet + UNet reproduce the official outputs (fp32, max abs err <= 1e-4)."""
from __future__ import annotations


import jax
import numpy as np
import pytest

from pasd_jax.convert import from_pytorch
from pasd_jax.convert.io import load_safetensors

# Measured (max over the 3 sets, both scales, all 11 outputs): 5.9e-6 (tiny_pasd_rrdb down.1, |x| <= 3.7; tiny_pasd
# 3.5e-6, tiny_pasd_light 5.1e-6). The golden's own float32 error, our modules in float64 vs the golden
# (tools/tolerances/measure_f64.py): up to 2.7e-6 / 2.7e-6 / 4.5e-6, as the golden READMEs state for the official
# float64 run; our float32 vs our float64: up to 7.7e-6. 1e-4 is ~17x the measure (the README suggests 1e-5..1e-4).
TOL = 1e-4
# (golden folder, UNet folder, expected UNet variant, expected RRDB)
SETS = {
    "tiny_pasd": ("tiny_pasd", "tiny_pasd", "pasd", False),
    "tiny_pasd_light": ("tiny_pasd_light", "tiny_pasd_light", "pasd_light", False),
    "tiny_pasd_rrdb": ("tiny_pasd_rrdb", "tiny_pasd", "pasd", True),
}


@pytest.fixture(scope="module", params=sorted(SETS))
def golden_run(request, golden_dir):
    name = request.param
    folder, unet_folder, variant, rrdb = SETS[name]
    unet, unet_params = from_pytorch(golden_dir / unet_folder / "unet")
    cn, cn_params = from_pytorch(golden_dir / folder / "controlnet")
    io = load_safetensors(golden_dir / folder / "inputs_outputs.safetensors")

    @jax.jit
    def forward(cn_params, unet_params, sample, t, ehs, cond, scale):
        rgbs, down, mid = cn.apply({"params": cn_params}, sample, t, ehs, cond, scale)
        pred = unet.apply({"params": unet_params}, sample, t, ehs, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)
        return rgbs, down, mid, pred

    inputs = (io["input.sample"], io["input.timesteps"], io["input.encoder_hidden_states"],
              io["input.controlnet_cond"])
    outs = {s: jax.device_get(forward(cn_params, unet_params, *inputs, s)) for s in (1.0, 0.5)}
    return dict(name=name, unet=unet, cn=cn, io=io, outs=outs, variant=variant, rrdb=rrdb)


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_variant_detected_from_keys(golden_run):
    assert golden_run["unet"].variant == golden_run["variant"]
    assert golden_run["cn"].config.use_rrdb == golden_run["rrdb"]


@pytest.mark.parametrize("scale,tag", [(1.0, "s1"), (0.5, "s05")])
def test_controlnet_and_unet_match_golden(golden_run, scale, tag):
    io = golden_run["io"]
    rgbs, down, mid, pred = golden_run["outs"][scale]
    assert len(down) == 6 and len(rgbs) == 3
    errors = {f"down.{k}": _err(d, io[f"controlnet.{tag}.down_block_res_samples.{k}"]) for k, d in enumerate(down)}
    errors["mid"] = _err(mid, io[f"controlnet.{tag}.mid_block_res_sample"])
    errors.update({f"rgbs.{k}": _err(r, io[f"controlnet.rgbs.{k}"]) for k, r in enumerate(rgbs)})
    errors["unet.noise_pred"] = _err(pred, io[f"unet.{tag}.noise_pred"])
    print(f"\n{golden_run['name']} scale {scale}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOL, errors


def test_conditioning_scale_only_scales_residuals(golden_run):
    (r1, d1, m1, _), (r05, d05, m05, _) = golden_run["outs"][1.0], golden_run["outs"][0.5]
    err = max(_err(np.asarray(a) * 0.5, b) for a, b in zip((*d1, m1), (*d05, m05)))
    print(f"\n{golden_run['name']}: max |0.5 * residual(scale 1) - residual(scale 0.5)| = {err:.2e}")
    # Measured 0 for all three sets: the scale multiplies each residual last, inside the same program, and halving
    # is exact in float32, so the two runs agree bit for bit (was atol 1e-6).
    assert err == 0.0
    for a, b in zip(r1, r05):
        np.testing.assert_array_equal(a, b)

