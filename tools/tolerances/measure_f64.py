"""How far the float32 PyTorch goldens are from a float64 evaluation of the same computation (our modules in
float64, see `widen.py`), next to how far our float32 result is from the same float64 one.

The parity tests compare our float32 outputs with the golden's float32 outputs. Both carry their own float32
rounding, so a correct port can differ from the golden by about |golden - exact| + |ours - exact|; this script
measures both terms, and the test tolerances quote its table.

    python tools/tolerances/measure_f64.py                       # every section (2-5 min on 2 busy cores)
    python tools/tolerances/measure_f64.py --only models resnet  # some sections

Columns (max abs over the tensor, float64 arithmetic):
  |f32-gold|  our float32 output vs the golden (what the parity test measures; "-": see the test's own print)
  |f64-gold|  our float64 evaluation vs the golden: the golden's own float32 rounding (plus ours in f64, ~1e-15)
  |f32-f64|   our float32 output vs our float64 one: our own float32 rounding
  max|gold|   scale of the tensor
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# as tests/conftest.py, so the float32 columns are the numbers the tests see
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from widen import to_f64, widen  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECTIONS = ("models", "components", "resnet", "schedulers", "sampling")
PROMPT = "a bird, clean, high-resolution, 8k"
NEGATIVE = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
ROWS: list[tuple] = []


def d(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def row(section: str, name: str, gold, f64, f32=None) -> None:
    ROWS.append((section, name, None if f32 is None else d(f32, gold), d(f64, gold),
                 None if f32 is None else d(f32, f64), float(np.abs(np.asarray(gold, np.float64)).max())))


def fmt(x) -> str:
    return "-" if x is None else str(x) if isinstance(x, int) else f"{x:.2e}"


# --- ControlNet + UNet goldens (tests/test_models_golden.py) ---------------------------------------------------

MODEL_SETS = {"tiny_pasd": ("tiny_pasd", "tiny_pasd"), "tiny_pasd_light": ("tiny_pasd_light", "tiny_pasd_light"),
              "tiny_pasd_rrdb": ("tiny_pasd_rrdb", "tiny_pasd")}


def _forward(gold: pathlib.Path, folder: str, unet_folder: str, dtype) -> tuple[dict, dict]:
    from pasd_jax.convert import from_pytorch
    from pasd_jax.convert.io import load_safetensors
    unet, up = from_pytorch(gold / unet_folder / "unet", dtype=dtype, param_dtype=dtype)
    cn, cp = from_pytorch(gold / folder / "controlnet", dtype=dtype, param_dtype=dtype)
    io = load_safetensors(gold / folder / "inputs_outputs.safetensors")
    x = [jnp.asarray(io[k], dtype) for k in ("input.sample", "input.encoder_hidden_states", "input.controlnet_cond")]
    t = jnp.asarray(io["input.timesteps"])

    @jax.jit
    def fwd(cp, up, scale):
        rgbs, down, mid = cn.apply({"params": cp}, x[0], t, x[1], x[2], scale)
        pred = unet.apply({"params": up}, x[0], t, x[1], down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)
        return rgbs, down, mid, pred
    return {s: jax.device_get(fwd(cp, up, jnp.asarray(s, dtype))) for s in (1.0, 0.5)}, io


def measure_models(gold: pathlib.Path, f32_outs: dict) -> None:
    for name, (folder, unet_folder) in MODEL_SETS.items():
        outs, io = _forward(gold, folder, unet_folder, jnp.float64)
        for scale, tag in ((1.0, "s1"), (0.5, "s05")):
            r64, d64, m64, p64 = outs[scale]
            r32, d32, m32, p32 = f32_outs[name][scale]
            pairs = [(f"down.{k}", d64[k], d32[k], io[f"controlnet.{tag}.down_block_res_samples.{k}"])
                     for k in range(6)]
            pairs += [("mid", m64, m32, io[f"controlnet.{tag}.mid_block_res_sample"])]
            pairs += [(f"rgbs.{k}", r64[k], r32[k], io[f"controlnet.rgbs.{k}"]) for k in range(3)]
            pairs += [("unet.noise_pred", p64, p32, io[f"unet.{tag}.noise_pred"])]
            for tensor, a64, a32, g in pairs:
                row(f"{name} scale {scale}", tensor, g, a64, a32)


def float32_models(gold: pathlib.Path) -> dict:
    """Our float32 forward of every model set, run before `widen()` (afterwards float32 would mean float64)."""
    return {name: _forward(gold, folder, unet_folder, jnp.float32)[0]
            for name, (folder, unet_folder) in MODEL_SETS.items()}


# --- text encoder and VAE (tests/test_pipeline_components.py) --------------------------------------------------

def _components(gold: pathlib.Path, dtype) -> list[tuple]:
    """[(section, name, ours, golden)] for the text encoder and the VAE of the tiny pipeline, in `dtype`."""
    from pasd_jax.convert import from_pytorch
    from pasd_jax.convert.io import load_safetensors
    from pasd_jax.models.vae import sample_posterior
    tp = gold / "tiny_pipeline"
    g = load_safetensors(tp / "pipeline_ddim.safetensors")
    out = []
    te, tparams = from_pytorch(tp / "text_encoder", dtype=dtype, param_dtype=dtype)
    for ids, emb in (("prompt_input_ids", "prompt_embeds"), ("negative_prompt_input_ids", "negative_prompt_embeds")):
        out.append(("text encoder", emb, te.apply({"params": tparams}, jnp.asarray(g[ids])), g[emb]))
    vae, vparams = from_pytorch(tp / "vae", dtype=dtype, param_dtype=dtype)
    mean, logvar = vae.apply({"params": vparams}, jnp.asarray(g["vae_encode_input"], dtype), method=vae.encode)
    z = vae.config.scaling_factor * sample_posterior(mean, logvar, jnp.asarray(g["random_draw.0"], dtype))
    image = vae.apply({"params": vparams}, jnp.asarray(g["vae_decode_input"], dtype), method=vae.decode)
    for name, ours, key in (("posterior_mean", mean, "vae_posterior_mean"),
                            ("posterior_logvar", logvar, "vae_posterior_logvar"),
                            ("sampled_latent", z, "add_noise.0.original"), ("decode", image, "vae_decode_output")):
        out.append(("VAE", name, ours, g[key]))
    return out


def float32_components(gold: pathlib.Path) -> list[tuple]:
    """Our float32 text encoder and VAE outputs, before `widen()`."""
    return [(sec, name, np.asarray(ours), g) for sec, name, ours, g in _components(gold, jnp.float32)]


def measure_components(gold: pathlib.Path, f32: list[tuple]) -> None:
    for (sec, name, ours, g), (_, _, ours32, _) in zip(_components(gold, jnp.float64), f32):
        row(sec, name, g, ours, ours32)


# --- torchvision ResNet-50 (tests/test_resnet.py) ---------------------------------------------------------------

def _resnet(gold: pathlib.Path):
    from pasd_jax.convert.io import load_safetensors
    from pasd_jax.convert.torchvision_resnet import load_torchvision_resnet50
    g = load_safetensors(gold / "resnet50" / "inputs_outputs.safetensors")
    model, variables = load_torchvision_resnet50(gold / "resnet50" / "resnet50.safetensors")
    return g, model, variables, jnp.asarray(g["pixel_values"])


def float32_resnet(gold: pathlib.Path) -> np.ndarray:
    """Our float32 logits, run before `widen()`."""
    _, model, variables, x = _resnet(gold)
    return np.asarray(jax.jit(model.apply)(variables, x))


def measure_resnet(gold: pathlib.Path, l32: np.ndarray) -> None:
    g, model, variables, x = _resnet(gold)
    m64 = model.clone(dtype=jnp.float64)
    l64, st = jax.jit(lambda v, x: m64.apply(v, x, mutable=["intermediates"]))(to_f64(variables),
                                                                                x.astype(jnp.float64))
    row("resnet50", "logits", g["logits"], l64, l32)
    p64 = np.take_along_axis(np.asarray(jax.nn.softmax(l64, -1)), g["top5_indices"], -1)
    p32 = np.take_along_axis(np.asarray(jax.nn.softmax(jnp.asarray(l32), -1)), g["top5_indices"], -1)
    row("resnet50", "top5_probs", g["top5_probs"], p64, p32)
    inter = st["intermediates"]
    feats = {"stem_out_img0": np.asarray(inter["stem"][0][:1]).transpose(0, 3, 1, 2),
             "layer4_out": np.asarray(inter["layer4"][0]).transpose(0, 3, 1, 2), "pooled": inter["pooled"][0]}
    for name, ours in feats.items():
        scale = float(np.abs(g[name]).max())
        row("resnet50 (/ max|gold|)", name, g[name] / scale, np.asarray(ours) / scale)


# --- the whole sampler (tests/test_sampling_golden.py, test_sampling_compile.py) --------------------------------

SAMPLING_RUNS = (("ddim", "official"), ("ddim", "paper"), ("unipc", "official"))


def _sampling(gold: pathlib.Path, dtype) -> dict:
    """The golden runs (recorded draws) through PASDPipeline in `dtype`: {(kind, mode): (result, golden, fixed)}."""
    from pasd_jax import image_ops
    from pasd_jax.convert import from_pytorch
    from pasd_jax.convert.io import load_safetensors
    from pasd_jax.models.bundle import from_pairs
    from pasd_jax.sampling.options import SamplingOptions
    from pasd_jax.sampling.pipeline import PASDPipeline
    tp, td = gold / "tiny_pipeline", gold / "tiny_pasd"
    models, params = from_pairs(*(from_pytorch(p, dtype=dtype, param_dtype=dtype)
                                  for p in (td / "unet", td / "controlnet", tp / "vae", tp / "text_encoder")))
    pipe = PASDPipeline(models, params, tp / "scheduler", tp / "tokenizer")
    out = {}
    for kind, mode in SAMPLING_RUNS:
        g = load_safetensors(tp / f"pipeline_{kind}.safetensors")
        opts = SamplingOptions(steps=4, scheduler=kind, ans_mode=mode, guidance_scale=9.0, conditioning_scale=1.0,
                               added_noise_level=900, dtype=jnp.dtype(dtype).name)
        draws = {"posterior": g["random_draw.0"], "noise": g["random_draw.1"], "added_noise": g["random_draw.2"]}
        image = g["input.upscaled_image_uint8"]
        r = pipe.run(image[None], [PROMPT], [NEGATIVE], None, opts, draws=draws, debug=True)
        out[kind, mode] = r, g, np.asarray(image_ops.wavelet_color_fix(r.images[0], image))
    return out


def float32_sampling(gold: pathlib.Path) -> dict:
    """Our float32 golden runs, before `widen()`."""
    return _sampling(gold, jnp.float32)


def measure_sampling(gold: pathlib.Path, f32: dict) -> None:
    for (kind, mode), (r, g, fixed) in _sampling(gold, jnp.float64).items():
        r32, _, fixed32 = f32[kind, mode]
        sec = f"sampling {kind} ({mode} ANS)"
        row(sec, "z_N", g["z_N"], r.z_n[0], r32.z_n[0])
        for i in range(4):
            row(sec, f"latent after step {i}", g[f"step.{i}.latents_out"], r.latents[i], r32.latents[i])
        row(sec, "vae decode output", g["vae_decode_output"], r.decoded, r32.decoded)
        for name, ours, ours32, key in (("uint8 image", r.images[0], r32.images[0], "image_pipeline_output_uint8"),
                                        ("uint8 colour-fixed", fixed, fixed32, "image_final_colorfix_uint8")):
            diff, diff32 = (np.asarray(a, np.int32) - g[key] for a in (ours, ours32))
            f32_64 = np.asarray(ours32, np.int32) - np.asarray(ours, np.int32)
            ROWS.append((sec, f"{name}: differing", int(np.count_nonzero(diff32)), int(np.count_nonzero(diff)),
                         int(np.count_nonzero(f32_64)), diff.size))
            ROWS.append((sec, f"{name}: max diff", int(np.abs(diff32).max()), int(np.abs(diff).max()),
                         int(np.abs(f32_64).max()), 255))


# --- scheduler steps alone (tests/test_schedulers.py) -------------------------------------------------------------

def _scheduler_steps(gold: pathlib.Path, dtype) -> list[tuple]:
    """[(section, name, ours, golden)]: every step from the recorded latents_in and guided noise predictions (fed)
    and chained from the recorded start, for the DDIM / UniPC pipelines and the zero-SNR UniPC of the gray one."""
    from pasd_jax.convert.io import load_safetensors
    from pasd_jax.schedulers import scheduler_from_config
    cases = [("ddim", gold / "tiny_pipeline", "pipeline_ddim", "z_N"),
             ("unipc", gold / "tiny_pipeline", "pipeline_unipc", "z_N"),
             ("unipc", gold / "tiny_pipeline_gray", "golden", "add_noise.1.out")]
    out = []
    for kind, folder, name, start in cases:
        g = load_safetensors(folder / f"{name}.safetensors")
        s = scheduler_from_config(folder / "scheduler", kind, 4)
        step = jax.jit(s.step)
        sec = f"scheduler {kind} ({folder.name})"
        for fed in (True, False):
            carry = s.init_carry(jnp.asarray(g[start], dtype))
            for i in range(4):
                if fed:
                    carry = carry._replace(sample=jnp.asarray(g[f"step.{i}.latents_in"], dtype))
                x, carry = step(carry, i, jnp.asarray(g[f"step.{i}.noise_pred_guided"], dtype))
                out.append((sec, f"{'fed' if fed else 'chained'} step {i}", np.asarray(x), g[f"step.{i}.latents_out"]))
    return out


def float32_schedulers(gold: pathlib.Path) -> list[tuple]:
    return _scheduler_steps(gold, jnp.float32)


def measure_schedulers(gold: pathlib.Path, f32: list[tuple]) -> None:
    for (sec, name, ours, g), (_, _, ours32, _) in zip(_scheduler_steps(gold, jnp.float64), f32):
        row(sec, name, g, ours, ours32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--golden", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("PASD_GOLDEN_DIR", ROOT.parent / "shared" / "golden")))
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = ap.parse_args(argv)
    # float32 references first: after widen() the models' float32 islands are float64
    f32 = {"models": float32_models, "components": float32_components, "resnet": float32_resnet,
           "schedulers": float32_schedulers, "sampling": float32_sampling}
    f32 = {k: fn(args.golden) for k, fn in f32.items() if k in args.only}
    widen()
    measure = {"models": measure_models, "components": measure_components, "resnet": measure_resnet,
               "schedulers": measure_schedulers, "sampling": measure_sampling}
    for section in args.only:
        measure[section](args.golden, f32[section])
    print(f"\n{'section':<38} {'tensor':<30} {'|f32-gold|':>10} {'|f64-gold|':>10} {'|f32-f64|':>10} {'max|gold|':>10}")
    for sec, name, a, b, c, m in ROWS:
        print(f"{sec:<38} {name:<30} {fmt(a):>10} {fmt(b):>10} {fmt(c):>10} {fmt(m):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
