"""The memory plan: estimates from configs alone, and the switch to bounded attention / latent tiles under a budget
set through the environment, or a message naming the size, the estimate and the flags that help."""
from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from pasd_jax.convert.folders import build_module
from pasd_jax.errors import ConfigError, PasdError
from pasd_jax.models import attention
from pasd_jax.models.bundle import Models
from pasd_jax.models.config import controlnet_config_from_unet
from pasd_jax.sampling import memory
from pasd_jax.sampling.options import SamplingOptions
from tests.conftest import REPO


def _models(name: str) -> Models:
    assets = REPO / "pasd_jax" / "assets" / name
    cfg = {c: json.loads((assets / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}
    return Models(build_module("unet", cfg["unet"]), build_module("controlnet", controlnet_config_from_unet(cfg["unet"])),
                  build_module("vae", cfg["vae"]), build_module("text_encoder", cfg["text_encoder"]))


@pytest.fixture(scope="module")
def tiny() -> Models:
    return _models("tiny")


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(memory.ENV, "1.5G")
    assert memory.budget_from_env() == int(1.5 * 2**30)
    monkeypatch.setenv(memory.ENV, "800MB")
    assert memory.budget_from_env() == 800 * 10**6
    monkeypatch.setenv(memory.ENV, "off")
    assert memory.budget_from_env() is None
    monkeypatch.setenv(memory.ENV, "lots")
    with pytest.raises(ConfigError, match="PASD_MEMORY_BUDGET='lots' is not a memory size"):
        memory.budget_from_env()
    monkeypatch.delenv(memory.ENV)
    assert memory.budget_from_env("cpu") > 0  # host memory


def test_request_that_fits_is_returned_unchanged(tiny, monkeypatch):
    monkeypatch.setenv(memory.ENV, "64G")
    opts = SamplingOptions(steps=4)
    p = memory.plan(tiny, opts, 64, 64, backend="cpu")
    print("\n" + p.message)
    assert p.fits and p.options == opts and p.attention == "auto" and p.changes == ()
    assert p.estimate_bytes == p.estimate.total and "within" in p.message
    sizes = [memory.estimate(tiny, opts, s, s, backend="cpu").total for s in (64, 256, 1024)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_small_budget_switches_to_latent_tiles(tiny, monkeypatch):
    opts = SamplingOptions(steps=4)
    untiled = memory.estimate(tiny, opts, 1024, 1024, backend="cpu")  # 128x128 latent: below 320^2, untiled
    tiled = memory.estimate(tiny, SamplingOptions(steps=4, latent_tile_size=96, tile_batch=1), 1024, 1024,
                            backend="cpu")
    print(f"\n1024x1024 tiny: untiled {untiled.total / 1e6:.0f} MB, 96-latent tiles {tiled.total / 1e6:.0f} MB")
    assert tiled.total < untiled.total and tiled.denoise < untiled.denoise
    budget = int((tiled.total + untiled.total) / 2 / memory.HEADROOM)
    monkeypatch.setenv(memory.ENV, str(budget))
    p = memory.plan(tiny, opts, 1024, 1024, backend="cpu")
    print(p.message)
    assert p.fits and p.options.latent_tile_size == 96 and p.options.tile_batch == 1
    assert "--latent-tile-size 96" in p.changes and p.estimate_bytes <= memory.HEADROOM * budget
    assert p.options.steps == 4  # everything else as asked


def test_small_budget_switches_attention_kernel(tiny, monkeypatch):
    # make the plain kernel the host default again, so the plan has to choose the bounded one
    monkeypatch.setattr(attention, "FLASH_MIN_BYTES", 1 << 60)
    opts = SamplingOptions(steps=4)
    plain = memory.estimate(tiny, opts, 512, 512, backend="cpu")
    flash = memory.estimate(tiny, opts, 512, 512, backend="cpu", impl="flash")
    print(f"\n512x512 tiny: xla attention {plain.attention / 1e6:.0f} MB, flash {flash.attention / 1e6:.1f} MB")
    assert plain.attention == 2 * 8 * 4096 * 4096 * 4  # the CFG pair's fp32 scores of the 4096-token layers
    budget = int((flash.total + plain.total) / 2 / memory.HEADROOM)
    monkeypatch.setenv(memory.ENV, str(budget))
    p = memory.plan(tiny, opts, 512, 512, backend="cpu")
    print(p.message)
    assert p.fits and p.attention == "flash" and p.changes == ("attention=flash",) and p.options == opts


def test_nothing_fits_names_size_estimate_and_flags(tiny, monkeypatch):
    monkeypatch.setenv(memory.ENV, "1MB")
    p = memory.plan(tiny, SamplingOptions(steps=4), 1024, 768, backend="cpu")
    print("\n" + p.message)
    assert not p.fits
    assert "768x1024" in p.message and f"{memory._gb(p.budget_bytes)} budget" in p.message
    assert "--process-size" in p.message and "PASD_MEMORY_BUDGET" in p.message
    assert "--latent-tile-size" in " ".join(p.changes) and "--dtype bfloat16" not in p.changes  # no help on a CPU
    on_gpu = memory.plan(tiny, SamplingOptions(steps=4), 1024, 768, backend="gpu")
    assert not on_gpu.fits and "--dtype bfloat16" in on_gpu.changes
    with pytest.raises(memory.MemoryPlanError) as e:
        p.check()
    assert isinstance(e.value, PasdError) and str(e.value) == p.message


def test_sd15_2400x1600_is_planned_before_compiling():
    """Issue 13.5: the untiled 300x200 latent with the plain kernel asked for 262 GB; the estimate shows it and
    shows what the bounded kernel saves, from configs alone."""
    sd = _models("sd15")
    opts = SamplingOptions(dtype="bfloat16")
    weights = 3_350_000_000  # bf16 SD1.5 + PASD: 1.676 G parameters (weight_bytes traces the modules: seconds)
    plain = memory.estimate(sd, opts, 2400, 1600, backend="cpu", impl="xla", weights=weights)
    auto = memory.estimate(sd, opts, 2400, 1600, backend="cpu", weights=weights)
    print(f"\nSD1.5 2400x1600 bf16: plain attention {plain.total / 1e9:.0f} GB, auto (flash) {auto.total / 1e9:.1f} GB")
    assert plain.total > 200e9  # 2 x 8 x 60000^2 fp32 scores: 230 GB
    assert auto.total < 40e9 and auto.attention < 100e6
    p = memory.plan(sd, opts, 2400, 1600, budget_bytes=8 * 2**30, backend="cpu", weights=weights)
    assert not p.fits and "1600x2400" in p.message and "VAE" in p.message


@pytest.mark.slow
def test_step_estimate_tracks_compiled_temporaries():
    """The denoising estimate against XLA's compiled temporaries of the SD1.5 ControlNet + UNet step with CFG at
    256 px (CPU, the sampler's compiler options; nothing is run, so no weights are needed)."""
    import jax

    from bench.bench_step import make_step, step_inputs
    from pasd_jax.convert.base import abstract_of
    from pasd_jax.sampling import xla_options

    sd15 = _models("sd15")
    step = make_step(sd15.unet, sd15.controlnet)
    ins = jax.eval_shape(lambda: step_inputs(256, 1, sd15.unet.config.cross_attention_dim, jnp.float32))
    temp = step.lower(abstract_of(sd15.unet), abstract_of(sd15.controlnet), *ins).compile(
        compiler_options=xla_options.compiler_options() or None).memory_analysis().temp_size_in_bytes
    est, _ = memory.denoise_bytes(sd15, 2, 32, 32, "float32", "cpu", images=1)
    print(f"\nSD1.5 step at 256 px: estimate {est / 1e6:.1f} MB, compiled temporaries {temp / 1e6:.1f} MB")
    assert 0.85 * temp <= est <= 1.25 * temp  # calibration: 188.6 MB compiled, estimate 192.4 MB


def test_runner_refuses_a_size_that_cannot_fit_before_compiling(golden_dir, shared_dir, tmp_path, monkeypatch):
    """Issue 13.5 from the user's side: the folder runner asks the plan per processed size; an image that
    cannot fit fails with the size, the estimate and the flags, and nothing is compiled."""
    import shutil

    from pasd_jax.sampling import PASDPipeline, load_for_sampling
    from pasd_jax.sampling.runner import RunSettings, memory_options, run

    loaded = load_for_sampling(golden_dir / "tiny_pasd", base=golden_dir / "tiny_pipeline", cache=False)
    pipe = PASDPipeline(loaded.models, loaded.params, loaded.scheduler_config, loaded.tokenizer_dir)
    opts = SamplingOptions(steps=2)
    monkeypatch.setenv(memory.ENV, "64G")
    assert memory_options(pipe, opts, (64, 64), 1) == (opts, None)  # fits: the request as it is
    monkeypatch.setenv(memory.ENV, "1M")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_dir / "examples" / "Set5" / "bird.png", src / "bird.png")
    summary = run(pipe, opts, src, tmp_path / "out", RunSettings(process_size=64), lambda img, rel: "",
                  progress=False)
    print(summary.failed)
    assert [rel for rel, _ in summary.failed] == ["bird.png"] and not summary.written
    msg = summary.failed[0][1]
    assert "needs about" in msg and "PASD_MEMORY_BUDGET" in msg and "--process-size" in msg
    assert pipe.trace_count == 0  # refused before any program was traced


def test_cpu_bf16_counts_the_fp32_copies_xla_makes(tiny):
    """XLA's CPU backend widens bf16 weights to fp32 up front (all copies live at once): the plan counts them, and
    `--dtype auto` picks float32 on a CPU."""
    import jax

    from pasd_jax.sampling.options import resolve_dtype

    ws = [jnp.ones((512, 512), jnp.bfloat16) for _ in range(4)]

    def chain(ws, x):
        for w in ws:
            x = jnp.tanh(x @ w)
        return x
    temp = jax.jit(chain).lower(ws, jnp.ones((8, 512), jnp.bfloat16)).compile().memory_analysis().temp_size_in_bytes
    fp32 = 4 * 512 * 512 * 4
    print(f"\n4 bf16 weights of 512x512: compiled temporaries {temp / 2**20:.2f} MB, their fp32 copies "
          f"{fp32 / 2**20:.2f} MB")
    if jax.default_backend() == "cpu":
        assert temp >= fp32
    bf16 = memory.estimate(tiny, SamplingOptions(dtype="bfloat16"), 128, 128, backend="cpu")
    f32 = memory.estimate(tiny, SamplingOptions(dtype="float32"), 128, 128, backend="cpu")
    gpu = memory.estimate(tiny, SamplingOptions(dtype="bfloat16"), 128, 128, backend="gpu")
    want = sum(memory._param_bytes(getattr(tiny, c), 4) for c in ("unet", "controlnet", "vae"))
    assert bf16.widened == want and f32.widened == 0 and gpu.widened == 0
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", "gpu") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16"


def test_first_batch_of_a_size_announces_its_compilation(tiny):
    """Issue 19.4: the first batch of each processed size says that it compiles and for about how long."""
    import types

    from pasd_jax.sampling.runner import compile_note

    sampler, seen, opts = types.SimpleNamespace(models=tiny), set(), SamplingOptions(steps=2)
    first = compile_note(sampler, opts, (128, 96), seen)
    print("\n" + first)
    assert first.startswith("128x96: compiling the sampler") and " s on a 2-core CPU" in first
    assert compile_note(sampler, opts, (128, 96), seen) is None  # once per size and options
    assert "tiled sampler" in compile_note(sampler, SamplingOptions(steps=2, latent_tile_size=8, latent_tile_overlap=2), (128, 96), seen)
    assert compile_note(types.SimpleNamespace(), opts, (64, 64), set()) is None  # stand-in samplers stay quiet
