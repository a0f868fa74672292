"""Issue 14 acceptance: colorization against the official `test_pasd.py --control_type grayscale --use_pasd_light`
(golden `tiny_pipeline_gray`: zero-terminal-SNR UniPC, recorded draws injected), step by step, and the same run
in bf16 / fp16 (the schedule arithmetic stays float32, so the ANS start is never the fp16 zeros of the official).

Latents reach ~1e4 there (x0 prediction at t=999 multiplies by 4096), so latents are compared by error relative to
the tensor's max; the golden's own float32-vs-float64 distance is 2e-6 of it (golden README "Verification").
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pasd_jax.convert import from_pytorch
from pasd_jax.convert.io import load_safetensors
from pasd_jax.models.bundle import from_pairs
from pasd_jax.prompts import build_prompt_fn
from pasd_jax.sampling import colorize, tasks
from pasd_jax.sampling.options import SamplingOptions
from pasd_jax.sampling.pipeline import PASDPipeline

USER_PROMPT = "a black and white photo of a frog"
STEPS = 4


@pytest.fixture(scope="module")
def gray(golden_dir):
    return golden_dir / "tiny_pipeline_gray"


@pytest.fixture(scope="module")
def g(gray):
    return load_safetensors(gray / "golden.safetensors")


@pytest.fixture(scope="module")
def pipe(golden_dir, gray):
    tp, tl = golden_dir / "tiny_pipeline", golden_dir / "tiny_pasd_light"
    models, params = from_pairs(from_pytorch(tl / "unet"), from_pytorch(tl / "controlnet"), from_pytorch(tp / "vae"),
                                from_pytorch(tp / "text_encoder"))
    # the scheduler beside the checkpoint (<temp>/runs/pasd_color/scheduler in the official run)
    return PASDPipeline(models, params, gray / "scheduler", tp / "tokenizer")


@pytest.fixture(scope="module")
def prepared(gray):
    rgb = np.asarray(Image.open(gray / "input_color_48x40.png").convert("RGB"))
    return tasks.prepare("grayscale", rgb, upscale=4, process_size=64)   # upscale is ignored, as official


def _draws(g):
    return {"posterior": g["random_draw.0"], "noise": g["random_draw.1"], "added_noise": g["random_draw.2"]}


def _rel(a, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def _uint8_check(name, ours, ref, max_frac):
    diff = np.abs(np.asarray(ours, np.int32) - np.asarray(ref, np.int32))
    frac = float(np.mean(diff > 0))
    print(f"{name}: max uint8 diff {diff.max()}, {int((diff > 0).sum())} of {diff.size} values differ ({frac:.3%})")
    assert diff.max() <= 1 and frac <= max_frac, name


def _prompts(prepared):
    fn = build_prompt_fn("none", prompt=USER_PROMPT, control_type=tasks.control_type("colorize"))
    fn = tasks.with_added_prompt("colorize", fn, tasks.default_added_prompt("colorize"))
    return fn(Image.fromarray(prepared.original), "frog.png"), tasks.default_negative_prompt("colorize")


def test_preprocessing_and_prompts(pipe, g, prepared):
    np.testing.assert_array_equal(prepared.original, g["gray_input_rgb_uint8"])      # L -> RGB, exactly
    np.testing.assert_array_equal(prepared.lq, g["pipeline_input_image_uint8"])      # 48x40 -> 72x64, exactly
    assert prepared.out_size == (48, 40)
    prompt, negative = _prompts(prepared)
    assert (prompt, negative) == ("a color photo of a frog, ", "b&w, color bleeding")
    np.testing.assert_array_equal(pipe.tokenize([prompt]), g["text_encoder.call0.input_ids"])
    np.testing.assert_array_equal(pipe.tokenize([negative]), g["text_encoder.call1.input_ids"])
    context = np.asarray(pipe.encode_prompts([prompt], [negative]))[0]
    err = float(np.abs(context - g["encoder_hidden_states_cfg"]).max())
    print(f"\ntext embeddings [negative; positive]: max abs err {err:.2e}")
    assert err <= 1e-4   # DESIGN fp32 default; the golden's own float64 distance is 1.1e-6


def test_official_post_processing_is_exact(g, prepared):
    """The YUV merge on the official pipeline image gives the official final PNG bit for bit (cv2 calls)."""
    final = tasks.finish("colorize", g["image_pipeline_output_uint8"], prepared, color_fix="wavelet")
    np.testing.assert_array_equal(final, g["image_final_uint8"])


def test_pipeline_matches_official(pipe, g, prepared):
    prompt, negative = _prompts(prepared)
    opts = SamplingOptions(steps=STEPS, scheduler="unipc", ans_mode="official", guidance_scale=9.0,
                           conditioning_scale=1.0, added_noise_level=900)
    np.testing.assert_array_equal(pipe.scheduler("unipc", STEPS).timesteps, g["scheduler_timesteps"])
    r = pipe.run(prepared.lq[None], [prompt], [negative], None, opts, draws=_draws(g), debug=True)
    errors = {"z_N": _rel(r.z_n, g["add_noise.1.out"])}
    errors.update({f"step {i}": _rel(r.latents[i], g[f"step.{i}.latents_out"]) for i in range(STEPS)})
    dec = float(np.abs(np.asarray(r.decoded, np.float64) - g["vae_decode_output"]).max())
    print("\nlatent errors relative to the tensor's max |x|: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
          + f"; max |latent| {np.abs(g['step.3.latents_out']).max():.0f}; vae decode output max abs err {dec:.2e}")
    # Issue tolerance 1e-5 of the max (5x the golden's float32-vs-float64 distance, 2e-6).
    assert max(errors.values()) <= 1e-5
    assert dec <= 1e-4   # decoder output in [-1.1, 0.9]; the golden's float64 distance is 1.9e-6
    # Images: 1 level on at most 0.5 % of the values (rounding ties of a float32 port; issue tolerance).
    _uint8_check("pipeline image", r.images[0], g["image_pipeline_output_uint8"], 5e-3)
    final = tasks.finish("colorize", r.images[0], prepared, color_fix="wavelet")
    _uint8_check("final merged image", final, g["image_final_uint8"], 5e-3)


# fp16 is the official default and its failure case; bf16 is ours (slow: ~13 s of compiling on 2 cores each).
@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", marks=pytest.mark.slow), "float16"])
def test_half_precision_keeps_the_zero_snr_start(pipe, g, prepared, dtype):
    """The official default fp16 squares sigma(999) = 4096 to inf in add_noise and starts from exact zeros plus
    a weak second noise term (golden README "Diagnostics"); ours keeps the schedule in float32 at any dtype.
    z_N is then the float32 one up to the half-precision VAE encode, whose share in z_N is 2^-12 * 0.81."""
    prompt, negative = _prompts(prepared)
    opts = SamplingOptions(steps=STEPS, ans_mode="official", dtype=dtype)
    r = pipe.run(prepared.lq[None], [prompt], [negative], None, opts, draws=_draws(g), debug=True)
    z, want = np.asarray(r.z_n, np.float64), g["add_noise.1.out"]
    err = float(np.abs(z - want).max())
    print(f"\n{dtype}: z_N std {z.std():.4f} (golden float32 {want.std():.4f}), max abs err {err:.2e}; "
          f"last latent finite: {bool(np.isfinite(r.latents[-1]).all())}")
    assert np.isfinite(z).all() and err <= 1e-3   # measured ~1e-5: only the encode's rounding, scaled by 2e-4
    assert abs(z.std() / want.std() - 1) < 1e-3   # not the fp16 official's 0.551 / 0.991
    assert np.isfinite(r.latents).all()


def test_coloured_output_survives_post_processing(prepared):
    """A coloured model output (a colour picture with a strong, known chroma) keeps its chroma through the
    resize + YUV merge, in the right channel order, and the luma is the input's."""
    h, w = prepared.lq.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.stack([np.full((h, w), 200), 80 + 40 * (xx > w // 2), np.full((h, w), 60)], -1).astype(np.uint8)
    out[yy > h // 2] = (40, 90, 210)                                                   # top reddish, bottom blue
    final = tasks.finish("colorize", out, prepared, color_fix="wavelet")
    assert final.shape == prepared.original.shape
    uv_out = colorize.chroma(np.asarray(Image.fromarray(out).resize(final.shape[1::-1], Image.BILINEAR)))
    uv_final = colorize.chroma(final)
    top, bottom = slice(0, final.shape[0] // 3), slice(2 * final.shape[0] // 3, None)
    print(f"\nmean (U, V) - 128 top {uv_final[top].mean((0, 1))}, bottom {uv_final[bottom].mean((0, 1))}")
    # Channel order: red top has V >> 0 and U < 0; blue bottom has U >> 0. RGB/BGR swapped would flip both signs.
    assert uv_final[top, :, 1].mean() > 20 and uv_final[top, :, 0].mean() < -10
    assert uv_final[bottom, :, 0].mean() > 20 and uv_final[bottom, :, 1].mean() < 0
    # Chroma kept: within the clipping of YUV -> RGB (strong chroma on dark or bright luma clips a channel).
    kept = np.abs(uv_final - uv_out) <= 3
    print(f"chroma within 3 levels of the output's on {kept.mean():.1%} of values")
    assert kept.mean() > 0.5
    # Luma is the input's (up to that clipping): never the output's flat luma.
    y_final = np.asarray(Image.fromarray(final).convert("L"), np.int32)
    y_in = prepared.original[..., 0].astype(np.int32)
    close = np.abs(y_final - y_in) <= 2
    print(f"luma within 2 levels of the gray input on {close.mean():.1%} of pixels")
    assert close.mean() > 0.5 and np.corrcoef(y_final.ravel(), y_in.ravel())[0, 1] > 0.9
