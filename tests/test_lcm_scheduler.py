"""LCMScheduler against the official `--use_lcm_lora` goldens (diffusers 0.29.2 `LCMScheduler.from_config` of the
UniPC config test_pasd.py loads), and its contract inside one jitted lax.scan."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from pasd_jax.schedulers import (LCMScheduler, add_noise, ans_coefficients, ans_latents, effective_config,
                                 scheduler_from_config)
from pasd_jax.schedulers.config import LCM_DEFAULTS, load_config

GOLDENS = ["tiny_pipeline_lcm", "tiny_pipeline_lcm_peft"]


@pytest.fixture(scope="module")
def sd15_scheduler(golden_dir):
    return golden_dir / "tiny_pipeline" / "scheduler"


@pytest.fixture(scope="module", params=GOLDENS)
def golden(request, golden_dir):
    folder = golden_dir / request.param
    return request.param, folder, load_file(str(folder / "golden.safetensors"))


def _steps(g) -> int:
    return len(g["scheduler_timesteps"])


def test_effective_config_is_the_official_one(golden, sd15_scheduler):
    """`LCMScheduler.from_config(UniPC(SD1.5 file).config)`: the file's keys, LCM defaults for the rest."""
    name, folder, _ = golden
    official = json.loads((folder / "effective_scheduler_config.json").read_text())
    ours = effective_config(load_config(sd15_scheduler), "lcm")
    assert set(ours) == set(LCM_DEFAULTS)
    for key, value in ours.items():
        assert official[key] == value, (name, key, official[key], value)
    # the recorded config itself, `_use_default_values` and all, resolves to the same
    assert effective_config(official, "lcm") == ours


def test_timesteps_match_golden(golden, sd15_scheduler):
    name, _, g = golden
    s = scheduler_from_config(sd15_scheduler, "lcm", _steps(g))
    print(name, s.timesteps.tolist(), g["scheduler_timesteps"].tolist())
    assert s.timesteps.tolist() == g["scheduler_timesteps"].tolist()
    assert [int(g[f"step.{i}.t"]) for i in range(_steps(g))] == s.timesteps.tolist()
    if name == "tiny_pipeline_lcm":
        assert s.timesteps.tolist() == [999, 759, 499, 259]
    assert s.init_noise_sigma == 1.0


def _noise(g, i):
    """The official step noise: draws 3.. of the generator, one per step except the last."""
    n = _steps(g)
    return jnp.asarray(g[f"random_draw.{3 + i}"]) if i < n - 1 else jnp.zeros_like(jnp.asarray(g["step.0.latents_in"]))


def test_steps_reproduce_golden(golden, sd15_scheduler):
    """Each step from the recorded inputs (latent, guided noise prediction, step noise) and the chain from z_N."""
    name, _, g = golden
    n = _steps(g)
    s = scheduler_from_config(sd15_scheduler, "lcm", n)
    assert [f"random_draw.{3 + i}" in g for i in range(n)] == s.step_noise_used.tolist()   # no draw at the end
    step = jax.jit(s.step)
    fed, den, chained = [], [], []
    carry = s.init_carry(jnp.asarray(g["add_noise.1.out"]))
    for i in range(n):
        eps = jnp.asarray(g[f"step.{i}.noise_pred_guided"])
        out, c = step(s.init_carry(jnp.asarray(g[f"step.{i}.latents_in"])), i, eps, _noise(g, i))
        fed.append(float(np.abs(np.asarray(out) - g[f"step.{i}.latents_out"]).max()))
        den.append(float(np.abs(np.asarray(c.denoised) - g[f"step.{i}.denoised"]).max()))
        _, carry = step(carry, i, eps, _noise(g, i))
        chained.append(float(np.abs(np.asarray(carry.sample) - g[f"step.{i}.latents_out"]).max()))
    scale = [float(np.abs(g[f"step.{i}.latents_out"]).max()) for i in range(n)]
    print(f"{name}: max|latent| {scale}\n  fed latents_out err {fed}\n  denoised err {den}\n  chained err {chained}")
    # Required: <= 1e-4 abs. Measured: <= 7.6e-6, two float32 ulps of |z| <= 50.
    assert max(fed + den + chained) <= 1e-4
    np.testing.assert_array_equal(g[f"step.{n - 1}.latents_out"], g[f"step.{n - 1}.denoised"])


def test_whole_loop_in_one_jitted_scan(golden, sd15_scheduler):
    """Traced step index, the noise as a scanned input ([N, ...]; the last entry unused)."""
    name, _, g = golden
    n = _steps(g)
    s = scheduler_from_config(sd15_scheduler, "lcm", n)
    eps = jnp.stack([jnp.asarray(g[f"step.{i}.noise_pred_guided"]) for i in range(n)])
    noise = jnp.stack([_noise(g, i) for i in range(n)])

    @jax.jit
    def loop(sched, z, eps, noise):
        def body(carry, xs):
            i, e, nz = xs
            out, carry = sched.step(carry, i, e, nz)
            return carry, out
        return jax.lax.scan(body, sched.init_carry(z), (jnp.arange(n), eps, noise))[1]
    outs = np.asarray(loop(s, jnp.asarray(g["add_noise.1.out"]), eps, noise))
    err = max(float(np.abs(outs[i] - g[f"step.{i}.latents_out"]).max()) for i in range(n))
    print(name, "scan max abs err", err)
    assert err <= 1e-4   # as the eager chain above
    # The last step ignores its noise entry entirely (even NaN).
    bad = noise.at[n - 1].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(loop(s, jnp.asarray(g["add_noise.1.out"]), eps, bad)), outs)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_ans_with_lcm_matches_golden(golden, sd15_scheduler, mode):
    """LCM's add_noise indexes alphas_cumprod[t]: level 900 means t=900 in both modes (unlike UniPC)."""
    name, _, g = golden
    s = scheduler_from_config(sd15_scheduler, "lcm", _steps(g))
    c = ans_coefficients(s, 900, mode)
    assert c.first_timestep == int(g["add_noise.0.timesteps"][0]) == 999
    np.testing.assert_allclose(c.first, (0.0683, 0.998), atol=5e-4)     # README: 0.0683 x z + 0.998 x n1
    np.testing.assert_allclose(c.second, (0.119, 0.993), atol=5e-4)     # README: 0.119 x z + 0.993 x n2
    z_lr, n1, n2 = (jnp.asarray(g[k]) for k in ("add_noise.0.original", "random_draw.1", "random_draw.2"))
    first = np.asarray(add_noise(z_lr, n1, *c.first))
    z = np.asarray(ans_latents(z_lr, n1, n2, c))
    errs = (float(np.abs(first - g["add_noise.0.out"]).max()), float(np.abs(z - g["add_noise.1.out"]).max()))
    print(name, mode, c.first, c.second, "add_noise errs", errs)
    assert max(errs) <= 5e-7   # float32 rounding of |z| <= 3: a couple of ulps


def test_noise_contract(sd15_scheduler):
    s = scheduler_from_config(sd15_scheduler, "lcm", 4)
    assert s.needs_step_noise and s.step_noise_used.tolist() == [True, True, True, False]
    z = jnp.ones((1, 4, 2, 2))
    with pytest.raises(ValueError, match="needs the step's noise"):
        s.step(s.init_carry(z), 0, z)
    a, _ = s.step(s.init_carry(z), 0, z, jnp.zeros_like(z))
    b, _ = s.step(s.init_carry(z), 0, z, jnp.ones_like(z))
    np.testing.assert_allclose(np.asarray(b - a), s.sqrt_beta_next[0], rtol=1e-6)   # sqrt(1 - abar_759)
    one = scheduler_from_config(sd15_scheduler, "lcm", 1)
    assert not one.needs_step_noise and one.step_noise_used.tolist() == [False]
    out, c = one.step(one.init_carry(z), 0, z)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(c.denoised))


def test_lcm_arguments(sd15_scheduler):
    with pytest.raises(ValueError, match="cannot exceed original_inference_steps=50"):
        scheduler_from_config(sd15_scheduler, "lcm", 51)
    s = scheduler_from_config(sd15_scheduler, "lcm", 51, original_inference_steps=100)
    assert len(s.timesteps) == 51 and s.timesteps[0] == 999
    assert isinstance(s, LCMScheduler) and s.kind == "lcm"


def test_scheduler_is_a_pytree_argument(sd15_scheduler):
    traces = []

    @jax.jit
    def one_step(sched, carry, eps, noise):
        traces.append(1)
        return sched.step(carry, 1, eps, noise)[0]
    z = jnp.ones((1, 4, 2, 2))
    a = scheduler_from_config(sd15_scheduler, "lcm", 4)
    b = scheduler_from_config(sd15_scheduler, "lcm", 4)
    np.testing.assert_array_equal(one_step(a, a.init_carry(z), z, z), one_step(b, b.init_carry(z), z, z))
    assert len(traces) == 1
