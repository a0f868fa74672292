"""Compilation caching, batching, randomness, validation and device sharding of the sampler.

Trace counting uses a per-pixel stand-in for ControlNet + UNet (the tiny VAE and text encoder are real), which
keeps compilation cheap; the real models' program reuse is checked in test_sampling_golden.py and the tiled
model program's reuse across sizes in test_sampling_tiling.py. The 8-device test runs the real tiny pipeline
against the official golden in a subprocess with 8 fake CPU devices.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.convert import from_pytorch
from pasd_jax.models.bundle import from_pairs
from pasd_jax.sampling.options import SamplingOptions
from pasd_jax.sampling.pipeline import PASDPipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
NEG = "blurry, lowres"


def standin_eps(params, z, t, context, cond, guidance, cond_scale):
    n, _, h, w = z.shape
    pooled = cond.reshape(n, 3, h, 8, w, 8).mean(axis=(1, 3, 5))[:, None]
    text = context.mean(axis=(2, 3))
    pos = jnp.tanh(0.3 * z + cond_scale * pooled) * (t / 1000.0) + 0.1 * text[:, -1][:, None, None, None]
    if context.shape[1] == 1:
        return pos
    neg = 0.5 * pos + 0.1 * text[:, 0][:, None, None, None]
    return neg + guidance * (pos - neg)


@pytest.fixture(scope="module")
def pipe(golden_dir):
    tp, td = golden_dir / "tiny_pipeline", golden_dir / "tiny_pasd"
    models, params = from_pairs(from_pytorch(td / "unet"), from_pytorch(td / "controlnet"), from_pytorch(tp / "vae"),
                                from_pytorch(tp / "text_encoder"))
    return PASDPipeline(models, params, tp / "scheduler", tp / "tokenizer", eps_fn_factory=lambda m: standin_eps)


def _img(seed, h=64, w=64, b=1):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_one_program_per_size_and_steps(pipe):
    keys = jax.random.split(jax.random.key(0), 2)
    opts = SamplingOptions(steps=3)
    first = pipe.run(_img(0, b=2), ["a", "b"], [NEG], keys, opts)
    base = dict(pipe.trace_counts)
    assert base["untiled"] == 1 and not first.tiled
    # Other images, prompts, guidance, conditioning scale, ANS level and mode, offset noise: same program.
    for i, o in enumerate([SamplingOptions(steps=3, guidance_scale=4.0, conditioning_scale=0.3),
                           SamplingOptions(steps=3, added_noise_level=500, ans_mode="official")]):
        pipe.sample(_img(10 + i, b=2), ["c", "d"], ["e"], jax.random.split(jax.random.key(i + 1), 2), o)
    assert pipe.trace_counts["untiled"] == 1
    # A short batch padded to the full batch size reuses it too, and each image's result depends only on its
    # own key: image 0 alone (padded) equals image 0 of the pair.
    alone = pipe.sample(_img(0, b=2)[:1], ["a"], [NEG], keys[:1], opts, pad_to=2)
    np.testing.assert_array_equal(alone, first.images[:1])
    assert pipe.trace_counts["untiled"] == 1
    # A new processed size, a new step count: one new program each, then reused.
    for _ in range(2):
        pipe.sample(_img(3, 64, 48, b=2), ["a", "b"], [NEG], keys, opts)
    assert pipe.trace_counts["untiled"] == 2
    pipe.sample(_img(4, b=2), ["a", "b"], [NEG], keys, SamplingOptions(steps=2))
    pipe.sample(_img(5, b=2), ["a", "b"], [NEG], keys, SamplingOptions(steps=2))
    print(f"\ntrace counts: {dict(pipe.trace_counts)}")
    assert pipe.trace_counts["untiled"] == 3
    assert pipe.trace_counts["text_encoder"] == 1            # one encoder program, whatever the prompts


def test_step_progress_callback_leaves_the_result_unchanged(pipe):
    """The in-scan host callback reports every step while the one compiled program runs, and changes nothing."""
    keys = jax.random.split(jax.random.key(3), 2)
    opts = SamplingOptions(steps=4)
    plain = pipe.sample(_img(7, b=2), ["a", "b"], [NEG], keys, opts)
    seen = []
    with_bar = pipe.sample(_img(7, b=2), ["a", "b"], [NEG], keys, opts, on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    np.testing.assert_array_equal(with_bar, plain)
    again = []
    pipe.sample(_img(8, b=2), ["a", "b"], [NEG], keys, opts, on_step=lambda i, n: again.append(i))
    assert again == [1, 2, 3, 4]  # the program with the callback is cached and reports to the new listener


def test_prompt_encodings_are_cached(pipe):
    pipe.encode_prompts(["p1", "p2", "p1"], ["n", "n", "n"])
    n = len(pipe.text)
    ctx = pipe.encode_prompts(["p2", "p1"], ["n", "n"])
    assert len(pipe.text) == n and ctx.shape == (2, 2, 77, 24)
    np.testing.assert_array_equal(ctx[0, 0], ctx[1, 0])      # the same negative prompt


def test_keys_and_draws(pipe):
    opts = SamplingOptions(steps=3)
    keys = jax.random.split(jax.random.key(3), 2)
    a = pipe.sample(_img(0, b=2), ["a", "b"], [NEG], keys, opts)
    b = pipe.sample(_img(0, b=2), ["a", "b"], [NEG], jnp.stack([keys[0], jax.random.key(9)]), opts)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.any(a[1] != b[1])
    raw = jax.random.split(jax.random.PRNGKey(3), 2)                            # raw uint32 keys work too
    assert pipe.sample(_img(0, b=2), ["a", "b"], [NEG], raw, opts).shape == (2, 64, 64, 3)
    rng = np.random.default_rng(0)
    draws = {n: rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for n in ("posterior", "noise", "added_noise")}
    c = pipe.sample(_img(0, b=2), ["a", "b"], [NEG], None, opts, draws=draws)
    assert c.shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="missing"):
        pipe.sample(_img(0, b=2), ["a", "b"], [NEG], None, opts, draws={"noise": draws["noise"]})
    with pytest.raises(ValueError, match=r"draws\['noise'\] must have shape"):
        pipe.sample(_img(0, b=2), ["a", "b"], [NEG], None, opts, draws={**draws, "noise": draws["noise"][:1]})
    with pytest.raises(ValueError, match="one PRNG key per image"):
        pipe.sample(_img(0, b=2), ["a", "b"], [NEG], keys[:1], opts)


def test_ddim_eta_and_guidance_off(pipe):
    """eta > 0 draws DDIM's per-step noise from each image's key (or takes it from `draws`); guidance <= 1 runs the
    positive prompt alone, as the official pipeline does."""
    keys = jax.random.split(jax.random.key(4), 2)
    eta = SamplingOptions(steps=3, scheduler="ddim", eta=0.7)
    a = pipe.sample(_img(0, b=2), ["a", "b"], [NEG], keys, eta)
    np.testing.assert_array_equal(a, pipe.sample(_img(0, b=2), ["a", "b"], [NEG], keys, eta))
    assert np.any(a != pipe.sample(_img(0, b=2), ["a", "b"], [NEG], keys, SamplingOptions(steps=3, scheduler="ddim")))
    rng = np.random.default_rng(1)
    draws = {n: rng.standard_normal((2, 4, 8, 8)) for n in ("posterior", "noise", "added_noise")}
    with pytest.raises(ValueError, match="variance"):
        pipe.sample(_img(0, b=2), ["a", "b"], [NEG], None, eta, draws=draws)
    draws["variance"] = rng.standard_normal((2, 3, 4, 8, 8))
    assert pipe.sample(_img(0, b=2), ["a", "b"], [NEG], None, eta, draws=draws).shape == (2, 64, 64, 3)
    n = pipe.trace_counts["untiled"]
    off = pipe.run(_img(0, b=2), ["a", "b"], [NEG], keys, SamplingOptions(steps=3, guidance_scale=1.0), debug=True)
    assert pipe.trace_counts["untiled"] == n + 1                 # a batch of B instead of 2B: its own program
    on = pipe.run(_img(0, b=2), ["a", "b"], [NEG], keys, SamplingOptions(steps=3, guidance_scale=1.0001), debug=True)
    err = float(np.abs(off.latents - on.latents).max())
    print(f"\nguidance 1.0 (no CFG) vs 1.0001 (CFG): max latent diff {err:.1e}")
    # w -> 1 of CFG is the positive prompt alone: measured 5.9e-4, i.e. (w - 1) times a sensitivity of ~6 of the
    # latents to w; running the wrong prompt (or CFG with another w) at w = 1 would differ at the latent scale (~1).
    assert 0 < err <= 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(scheduler="euler"), "scheduler"), (dict(ans_mode="new"), "ans_mode"),
    (dict(added_noise_level=1000), "added_noise_level"), (dict(eta=0.5), "eta only applies"),
    (dict(latent_tile_overlap=320), "overlap"), (dict(tiled_vae="maybe"), "tiled_vae"),
    (dict(vae_encoder_tile=100), "vae_encoder_tile"), (dict(dtype="int8"), "dtype"),
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(tile_batch=0), "tile_batch")])
def test_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kwargs)


def test_bad_inputs_have_clear_errors(pipe):
    keys = jax.random.split(jax.random.key(0), 1)
    opts = SamplingOptions(steps=3)
    with pytest.raises(ValueError, match="uint8"):
        pipe.sample(_img(0).astype(np.float32), ["a"], [NEG], keys, opts)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.sample(_img(0, 60, 64), ["a"], [NEG], keys, opts)
    with pytest.raises(ValueError, match="one prompt"):
        pipe.sample(_img(0), ["a", "b"], [NEG], keys, opts)
    with pytest.raises(TypeError, match="SamplingOptions"):
        pipe.sample(_img(0), ["a"], [NEG], keys, {"steps": 3})


_SHARDED = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from pasd_jax.convert import from_pytorch
    from pasd_jax.convert.io import load_safetensors
    from pasd_jax.models.bundle import from_pairs
    from pasd_jax.sampling.options import SamplingOptions
    from pasd_jax.sampling.pipeline import PASDPipeline
    tp, td = sys.argv[1] + "/tiny_pipeline", sys.argv[1] + "/tiny_pasd"
    g = load_safetensors(tp + "/pipeline_ddim.safetensors")
    models, params = from_pairs(from_pytorch(td + "/unet"), from_pytorch(td + "/controlnet"),
                                from_pytorch(tp + "/vae"), from_pytorch(tp + "/text_encoder"))
    pipe = PASDPipeline(models, params, tp + "/scheduler", tp + "/tokenizer")
    img = g["input.upscaled_image_uint8"]
    both = lambda k: np.concatenate([g[k], np.ascontiguousarray(g[k][..., ::-1])])
    draws = {"posterior": both("random_draw.0"), "noise": both("random_draw.1"), "added_noise": both("random_draw.2")}
    r = pipe.run(np.stack([img, np.ascontiguousarray(img[::-1])]), ["a bird, clean, high-resolution, 8k", "a cat"],
                 ["blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"], None,
                 SamplingOptions(steps=4, scheduler="ddim", ans_mode="official"), draws=draws, debug=True)
    err = max(float(np.abs(r.latents[i][0] - g[f"step.{i}.latents_out"][0]).max()) for i in range(4))
    diff = np.abs(r.images[0].astype(int) - g["image_pipeline_output_uint8"])

    # Tiled: one large image; its 2x2 tiles (chunks of 2 rounded up to 8) are split over the devices. A per-pixel
    # stand-in with a pure-noise start makes the exact result a few lines of numpy (DDIM, eta 0).
    def standin(params, z, t, context, cond, guidance, cond_scale):
        return 0.9 * z + 0.1 * cond[:, :1, ::8, ::8] + 0.01 * context[:, -1, 0, :1][:, :, None, None]
    opts = SamplingOptions(steps=3, scheduler="ddim", latent_tile_size=8, latent_tile_overlap=3, init_noise=True,
                           guidance_scale=1.0)
    big = np.ascontiguousarray(np.tile(img, (2, 2, 1))[None, :96, :80])              # latent 12 x 10
    rng = np.random.default_rng(0)
    tdraws = {"noise": 0.5 * rng.standard_normal((1, 4, 12, 10)), "offset_noise": np.zeros((1, 4, 1, 1))}
    sp = PASDPipeline(models, params, tp + "/scheduler", tp + "/tokenizer", eps_fn_factory=lambda m: standin)
    tiled = sp.run(big, ["x"], ["y"], None, opts, draws=tdraws, debug=True)
    ctx = np.asarray(sp.encode_prompts(["x"], ["y"], cfg=False))[:, -1, 0, :1][:, :, None, None]
    sched = sp.scheduler("ddim", 3)
    z = tdraws["noise"]
    ref = []
    for i in range(3):
        eps = 0.9 * z + 0.1 * big.transpose(0, 3, 1, 2)[:, :1, ::8, ::8] / 255.0 + 0.01 * ctx
        a, b, ap, d = (float(np.asarray(v)[i]) for v in (sched.sqrt_alpha_t, sched.sqrt_beta_t,
                                                          sched.sqrt_alpha_prev, sched.direction_coef))
        z = ap * (z - b * eps) / a + d * eps
        ref.append(z)
    print(json.dumps({"device_count": jax.device_count(), "mesh": pipe.mesh.size, "devices": r.devices,
                      "latent_err": err, "uint8_max_diff": int(diff.max()), "uint8_differ": int((diff > 0).sum()),
                      "shape": list(r.images.shape), "tiled": tiled.tiled, "tiled_devices": tiled.devices,
                      "tiled_err": float(np.abs(tiled.latents - np.stack(ref)).max())}))
""")


def test_batch_sharded_over_8_devices_matches_golden(golden_dir, tmp_path):
    """Two images padded to 8 and split over 8 fake CPU devices; image 0 still matches the official run. A large
    image's tiles split over 8 devices give the exact result of a per-pixel stand-in model."""
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script), str(golden_dir)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n8 fake devices: {result}")
    assert result["device_count"] == 8 and result["mesh"] == 8 and result["devices"] == 8
    assert result["shape"] == [2, 64, 64, 3]
    # Measured 3.1e-5 (|z| <= 17); single device 2.4e-5, and the golden itself is 2.0e-5 from a float64 run
    # (tools/tolerances/measure_f64.py): the DDIM latent tolerance of test_sampling_golden.
    assert result["latent_err"] <= 1e-4
    # Measured 1 value off by 1 (of 12288); at most 0.1% may sit on a rounding boundary, as in test_sampling_golden.
    assert result["uint8_max_diff"] <= 1 and result["uint8_differ"] <= 12
    assert result["tiled"] and result["tiled_devices"] == 8
    assert result["tiled_err"] <= 1e-6      # float32 vs the float64 numpy loop: measured 1.6e-7 (a few ulps)
