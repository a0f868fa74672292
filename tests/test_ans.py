"""Adjustable noise schedule (spec 4.5) against the golden latent initialisation of both tiny pipelines."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from pasd_jax.schedulers import (add_noise, ans_coefficients, ans_latents, ans_latents_from_key, pure_noise_latents,
                                 pure_noise_latents_from_key, scheduler_from_config)


@pytest.fixture(scope="module")
def pipe_dir(golden_dir):
    return golden_dir / "tiny_pipeline"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _load(pipe_dir, kind):
    return load_file(str(pipe_dir / f"pipeline_{kind}.safetensors"))


@pytest.mark.parametrize("kind,mode", [("ddim", "paper"), ("ddim", "official"), ("unipc", "official")])
def test_z_n_matches_golden(pipe_dir, kind, mode):
    g = _load(pipe_dir, kind)
    s = scheduler_from_config(pipe_dir / "scheduler", kind, 4)
    c = ans_coefficients(s, 900, mode)
    assert c.first_timestep == int(g["add_noise.0.timesteps"][0]) == int(s.timesteps[0])
    assert c.level == int(g["add_noise.1.timesteps"][0]) == 900
    z_lr, n1, n2 = (jnp.asarray(g[k]) for k in ("add_noise.0.original", "random_draw.1", "random_draw.2"))
    np.testing.assert_array_equal(g["add_noise.0.noise"], g["random_draw.1"])
    np.testing.assert_array_equal(g["add_noise.1.noise"], g["random_draw.2"])
    first = np.asarray(add_noise(z_lr, n1, *c.first))
    second = np.asarray(add_noise(jnp.asarray(g["add_noise.1.original"]), n2, *c.second))
    z = np.asarray(ans_latents(z_lr, n1, n2, c))
    errs = {name: float(np.abs(a - g[key]).max()) for name, a, key in
            [("add_noise.0.out", first, "add_noise.0.out"), ("add_noise.1.out", second, "add_noise.1.out"),
             ("z_N", z, "z_N")]}
    print(kind, mode, c.first, c.second, errs)
    # Float32 rounding only: at most 2 ulps of |z| <= 3.2. Measured 2.4e-7 (1 ulp); the golden's z_N is 1.9e-7 /
    # 2.7e-7 from the float64 evaluation (tools/tolerances/measure_f64.py).
    assert max(errs.values()) <= 5e-7


def test_golden_coefficients_as_recorded(pipe_dir):
    """The multipliers the golden README states for the 4-step runs."""
    ddim = scheduler_from_config(pipe_dir / "scheduler", "ddim", 4)
    unipc = scheduler_from_config(pipe_dir / "scheduler", "unipc", 4)
    # The README gives 5 decimals (+-5e-6); measured at most 4.9e-6 (0.06826489 vs 0.06826).
    for mode in ("paper", "official"):
        c = ans_coefficients(ddim, 900, mode)
        np.testing.assert_allclose(c.first, (0.23605, 0.97174), atol=6e-6)
        np.testing.assert_allclose(c.second, (0.11896, 0.99290), atol=6e-6)
    c = ans_coefficients(unipc, 900, "official")
    np.testing.assert_allclose(c.first, (0.06826, 0.99767), atol=6e-6)
    np.testing.assert_allclose(c.second, (0.82085, 0.57115), atol=6e-6)   # sigma of t=250, not of 900
    c = ans_coefficients(unipc, 900, "paper")
    np.testing.assert_allclose(c.second, (0.11896, 0.99290), atol=6e-6)


def test_unipc_paper_mode_differs_from_official_golden(pipe_dir):
    g = _load(pipe_dir, "unipc")
    s = scheduler_from_config(pipe_dir / "scheduler", "unipc", 4)
    args = [jnp.asarray(g[k]) for k in ("add_noise.0.original", "random_draw.1", "random_draw.2")]
    z_paper = np.asarray(ans_latents(*args, ans_coefficients(s, 900, "paper")))
    diff = float(np.abs(z_paper - g["z_N"]).max())
    print("unipc paper vs official golden z_N max abs diff", diff)
    assert diff > 0.5          # measured 2.15 (|z| <= 3.3): the modes differ at the latent scale, not by rounding


def test_twenty_step_unipc_coefficients(pipe_dir):
    """Spec 4.5: LR-signal coefficient 0.00812 (paper) vs 0.0666 (official, 900 falls back to t=50)."""
    s = scheduler_from_config(pipe_dir / "scheduler", "unipc", 20)
    paper, official = ans_coefficients(s, 900, "paper"), ans_coefficients(s, 900, "official")
    print("lr signal: paper", paper.lr_signal, "official", official.lr_signal)
    assert round(paper.lr_signal, 5) == 0.00812
    assert round(official.lr_signal, 4) == 0.0666
    abar = s.alphas_cumprod
    in_sched = ans_coefficients(s, 899, "official")
    rel = {"paper lr_signal": _rel(paper.lr_signal, np.sqrt(float(abar[900]) * float(abar[999]))),
           "official second^2": _rel(official.second[0] ** 2, abar[50]),
           "variance paper": _rel(paper.lr_signal ** 2 + paper.noise_scale ** 2, 1.0),
           "variance official": _rel(official.lr_signal ** 2 + official.noise_scale ** 2, 1.0),
           "899 official vs paper": _rel(in_sched.second, ans_coefficients(s, 899, "paper").second)}
    print("max relative errors", rel, "|second[0] - 0.9755|", abs(float(official.second[0]) - 0.9755))
    # Float32 coefficients vs float64 formulas: measured 4.0e-8, 6.3e-8, 3.2e-8, 1.3e-8, 6.2e-8 (under one float32
    # ulp, 1.2e-7). The square was checked at rtol 1e-5 (~160x the measure), now 3e-7 (2.5 ulps).
    np.testing.assert_allclose(paper.lr_signal, np.sqrt(float(abar[900]) * float(abar[999])), rtol=1e-6)
    np.testing.assert_allclose(official.second[0] ** 2, abar[50], rtol=3e-7)          # sqrt(abar_50) = 0.9755
    np.testing.assert_allclose(official.second[0], 0.9755, atol=5e-5)    # the spec's 4 decimals; measured 1.2e-5
    # Both modes are variance preserving.
    for c in (paper, official):
        np.testing.assert_allclose(c.lr_signal ** 2 + c.noise_scale ** 2, 1.0, rtol=1e-6)
    # A level that is in the inference schedule behaves as the paper in official mode too.
    np.testing.assert_allclose(in_sched.second, ans_coefficients(s, 899, "paper").second, rtol=1e-6)


def test_ddim_indexes_alpha_bar_900(pipe_dir):
    s = scheduler_from_config(pipe_dir / "scheduler", "ddim", 20)
    abar900 = float(s.alphas_cumprod[900])
    for mode in ("paper", "official"):
        c = ans_coefficients(s, 900, mode)
        err = _rel(c.second, (np.sqrt(abar900), np.sqrt(1 - abar900)))
        print(mode, "ddim 20 steps", c.first_timestep, c.second, "abar900", abar900, "max relative error", err)
        # float32 sqrt vs float64: measured 1.6e-8 (below one ulp)
        np.testing.assert_allclose(c.second, (np.sqrt(abar900), np.sqrt(1 - abar900)), rtol=1e-6)
        # the paper's "0.1189" is sqrt(abar_900); 5 decimals here, measured 1.5e-6 from 0.11896
        np.testing.assert_allclose(c.second[0], 0.11896, atol=6e-6)
        assert c.first_timestep == 951


def test_bad_arguments(pipe_dir):
    s = scheduler_from_config(pipe_dir / "scheduler", "ddim", 4)
    with pytest.raises(ValueError, match="mode"):
        ans_coefficients(s, 900, "diffusers024")
    with pytest.raises(ValueError, match="outside"):
        ans_coefficients(s, 1000, "paper")


def test_keyed_draws_and_pure_noise(pipe_dir):
    s = scheduler_from_config(pipe_dir / "scheduler", "unipc", 4)
    c = ans_coefficients(s, 900, "paper")
    z_lr = jnp.zeros((2, 4, 8, 8))
    key = jax.random.key(3)
    a, b = ans_latents_from_key(z_lr, key, c), ans_latents_from_key(z_lr, key, c)
    np.testing.assert_array_equal(a, b)
    k1, k2 = jax.random.split(key)
    manual = ans_latents(z_lr, jax.random.normal(k1, z_lr.shape), jax.random.normal(k2, z_lr.shape), c)
    np.testing.assert_array_equal(a, manual)

    noise = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 8, 8)), jnp.float32)
    offset = jnp.asarray([[[[1.0]], [[2.0]], [[3.0]], [[4.0]]]] * 2, jnp.float32)
    np.testing.assert_array_equal(pure_noise_latents(noise), noise)
    z = pure_noise_latents(noise, offset, offset_noise_scale=0.1)
    shift = np.asarray(z - noise)[:, :, 3, 5]
    print("offset shift relative error", _rel(shift, [[0.1, 0.2, 0.3, 0.4]] * 2))
    # (noise + 0.1 k) - noise in float32 with |noise| <= 3.3: measured 1.6e-7 relative (ulps of the sum over 0.1 k)
    np.testing.assert_allclose(shift, [[0.1, 0.2, 0.3, 0.4]] * 2, rtol=1e-5)
    zk = pure_noise_latents_from_key(key, (2, 4, 8, 8), offset_noise_scale=0.5)
    print("keyed pure noise std", float(jnp.std(zk)))
    # N(0, 1) plus 0.5 * per-channel N(0, 1): std about 1.1 (measured 1.08); 0 would mean no draw
    assert zk.shape == (2, 4, 8, 8) and float(jnp.std(zk)) > 0.5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_zero_snr_ans_is_float32_in_half_precision(golden_dir, dtype):
    """The colorization golden (zero terminal SNR, UniPC sigma 4096 at t=999): with fp16/bf16 latents the ANS is
    the float32 computation rounded once, and finite. The official fp16 add_noise squares sigma = 4096 to inf
    and returns 0 * z + 0 * noise (recorded with diffusers 0.29.2 in tests/data/scheduler_refs.json)."""
    import json
    import pathlib
    gray = golden_dir / "tiny_pipeline_gray"
    g = load_file(str(gray / "golden.safetensors"))
    s = scheduler_from_config(gray / "scheduler", "unipc", 4)
    c = ans_coefficients(s, 900, "official")
    # torch's float32 sqrt rounds sqrt(2^24 - 1) up to 4096 (README: alpha = 2^-12); correctly rounded it is one ulp
    # below 4096, so our alpha is one ulp (1.2e-7 relative) above 2^-12.
    np.testing.assert_allclose(c.first, (2.0 ** -12, 1.0), rtol=1.2e-7)     # measured 1.19e-7: that one ulp
    refs = json.loads((pathlib.Path(__file__).parent / "data" / "scheduler_refs.json").read_text())
    print("official fp16 add_noise at t=999 (signal, noise):", refs["fp16_official_unipc_add_noise_999"])
    z_lr, n1, n2 = (jnp.asarray(g[k], dtype) for k in ("add_noise.0.original", "random_draw.1", "random_draw.2"))
    z = ans_latents(z_lr, n1, n2, c)
    z32 = ans_latents(z_lr.astype(jnp.float32), n1.astype(jnp.float32), n2.astype(jnp.float32), c)
    assert z.dtype == dtype and np.isfinite(np.asarray(z, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(z, np.float32), np.asarray(z32.astype(dtype), np.float32))
    first = add_noise(z_lr, n1, *c.first)
    np.testing.assert_array_equal(np.asarray(first, np.float32),
                                  np.asarray(add_noise(z_lr.astype(jnp.float32), n1.astype(jnp.float32),
                                                       *c.first).astype(dtype), np.float32))
    err = float(np.abs(np.asarray(z, np.float32) - g["add_noise.1.out"]).max())
    print(jnp.dtype(dtype).name, "z_N vs the float32 golden, max abs err", err)
    # Only the inputs' and the output's rounding to the dtype: |z| <= 2.4, bf16 ulp 2^-7 * 2, fp16 2^-10 * 2.
    # Measured 9.3e-3 (bf16, 0.6 of the bound) and 1.3e-3 (fp16, 0.66).
    assert err <= (2.0 * 2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 * 2.0 ** -10)
