"""DDIM and UniPC against the tiny-pipeline golden (diffusers 0.29.2, official PASD pipeline)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from pasd_jax.schedulers import scheduler_from_config
from pasd_jax.schedulers import schedule as sch

UNIPC_20 = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]


@pytest.fixture(scope="module")
def pipe_dir(golden_dir):
    return golden_dir / "tiny_pipeline"


@pytest.fixture(scope="module", params=["ddim", "unipc"])
def kind_golden(request, pipe_dir):
    return request.param, load_file(str(pipe_dir / f"pipeline_{request.param}.safetensors"))


def test_effective_config_matches_golden(pipe_dir):
    for kind in ("ddim", "unipc"):
        raw = sch.load_config(pipe_dir / "scheduler")
        ours = sch.effective_config(raw, kind)
        golden = json.loads((pipe_dir / f"{kind}_effective_scheduler_config.json").read_text())
        for key, value in ours.items():
            assert golden[key] == value, (kind, key, golden[key], value)
        assert set(ours) == set(sch.DEFAULTS[kind])


def test_config_loading_forms(pipe_dir):
    folder = scheduler_from_config(pipe_dir, "ddim", 4)                        # pipeline folder
    file = scheduler_from_config(pipe_dir / "scheduler" / "scheduler_config.json", "ddim", 4)
    d = scheduler_from_config(json.loads((pipe_dir / "scheduler/scheduler_config.json").read_text()), "ddim", 4)
    for s in (file, d):
        np.testing.assert_array_equal(s.timesteps, folder.timesteps)
        np.testing.assert_array_equal(s.sqrt_alpha_prev, folder.sqrt_alpha_prev)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        scheduler_from_config(pipe_dir / "vae", "ddim", 4)
    with pytest.raises(ValueError, match="unknown unipc scheduler option"):
        scheduler_from_config(pipe_dir, "unipc", 4, no_such_option=1)


def test_timesteps_match_golden(kind_golden, pipe_dir):
    kind, g = kind_golden
    s = scheduler_from_config(pipe_dir / "scheduler", kind, 4)
    print(kind, s.timesteps, g["scheduler_timesteps"])
    np.testing.assert_array_equal(s.timesteps, g["scheduler_timesteps"])
    for i in range(4):
        assert int(g[f"step.{i}.t"]) == s.timesteps[i]


def test_unipc_20_step_timesteps(pipe_dir):
    s = scheduler_from_config(pipe_dir / "scheduler", "unipc", 20)
    assert s.timesteps.tolist() == UNIPC_20
    # Warm-up order 1, then order 2, and the last step of order 1 (lower_order_final).
    assert s.orders.tolist() == [1] + [2] * 18 + [1]
    assert s.sigmas[-1] == 0.0


def test_spacings():
    kw = dict(num_train_timesteps=1000, steps_offset=1)
    assert sch.spaced_timesteps(4, spacing="leading", **kw).tolist() == [751, 501, 251, 1]
    assert sch.spaced_timesteps(4, spacing="leading", multistep=True, **kw).tolist() == [801, 601, 401, 201]
    assert sch.spaced_timesteps(4, spacing="linspace", **kw).tolist() == [999, 666, 333, 0]
    assert sch.spaced_timesteps(4, spacing="linspace", multistep=True, **kw).tolist() == [999, 749, 500, 250]
    assert sch.spaced_timesteps(4, spacing="trailing", **kw).tolist() == [999, 749, 499, 249]
    assert sch.spaced_timesteps(3, spacing="trailing", multistep=True, **kw).tolist() == [999, 666, 332]
    with pytest.raises(ValueError):
        sch.spaced_timesteps(4, spacing="karras")


def test_beta_schedules():
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, trained_betas=None)
    scaled = sch.make_betas({**base, "beta_schedule": "scaled_linear"})
    abar = sch.alphas_cumprod_from_betas(scaled)
    # Spec 4.5: abar_50, abar_400, abar_900, abar_999 of SD1.5.
    spec_abar = [0.95158, 0.42448, 0.014151, 0.0046601]
    linear = sch.make_betas({**base, "beta_schedule": "linear"})
    cos = sch.make_betas({**base, "beta_schedule": "squaredcos_cap_v2"})
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    abar_cos = sch.alphas_cumprod_from_betas(cos)
    cos_ref = f(np.arange(1, 901) / 1000) / f(0)
    rel = {"abar vs spec": _rel(abar[[50, 400, 900, 999]], spec_abar),
           "sqrt(scaled_linear)": _rel(np.sqrt(scaled), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000)),
           "linear": _rel(linear, np.linspace(0.00085, 0.012, 1000)), "cosine abar[:900]": _rel(abar_cos[:900], cos_ref)}
    print("abar", abar[[50, 400, 900, 999]], "max relative errors", rel)
    # The spec's values have 5 significant digits (0.014151 is +-3.5e-5 relative); measured 9.4e-6.
    np.testing.assert_allclose(abar[[50, 400, 900, 999]], spec_abar, rtol=1e-4)
    # float32 tables vs float64 formulas: measured 9.0e-8 (sqrt), 9.3e-8 (linear), about one float32 ulp.
    np.testing.assert_allclose(np.sqrt(scaled), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000), rtol=1e-6)
    np.testing.assert_allclose(linear, np.linspace(0.00085, 0.012, 1000), rtol=1e-6)
    # the float32 cumulative product of 900 betas: measured 5.6e-7
    np.testing.assert_allclose(abar_cos[:900], cos_ref, rtol=1e-5)
    assert cos.max() <= np.float32(0.999)
    zsnr = sch.make_betas({**base, "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True})
    abar_z = sch.alphas_cumprod_from_betas(zsnr)
    print("zero-snr abar[0], abar[-1]", abar_z[0], abar_z[-1], "|abar_z[0] - abar[0]|", abs(abar_z[0] - abar[0]))
    # The rescale maps sqrt(abar) by a shift (to exactly 0 at T-1) and a scale that fixes the first value: measured
    # abar_z[-1] == 0 and abar_z[0] == abar[0] bit for bit; allowed one float32 ulp at 1 for the rescale's rounding
    # (was < 1e-10 and < 1e-6, ~17 ulps).
    assert float(abar_z[-1]) == 0.0 and abs(abar_z[0] - abar[0]) <= np.spacing(np.float32(1))
    with pytest.raises(NotImplementedError):
        sch.make_betas({**base, "beta_schedule": "sigmoid"})


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _run_steps(s, g, feed_golden_latents: bool):
    """Step through the golden's guided noise predictions; returns the per-step max abs error."""
    carry = s.init_carry(jnp.asarray(g["z_N"]))
    step = jax.jit(s.step)
    errs = []
    for i in range(4):
        if feed_golden_latents:
            carry = carry._replace(sample=jnp.asarray(g[f"step.{i}.latents_in"]))
        out, carry = step(carry, i, jnp.asarray(g[f"step.{i}.noise_pred_guided"]))
        errs.append(float(np.abs(np.asarray(out) - g[f"step.{i}.latents_out"]).max()))
    return errs


def test_steps_reproduce_golden_latents(kind_golden, pipe_dir):
    kind, g = kind_golden
    s = scheduler_from_config(pipe_dir / "scheduler", kind, 4)
    fed = _run_steps(s, g, feed_golden_latents=True)
    chained = _run_steps(s, g, feed_golden_latents=False)
    scale = [float(np.abs(g[f"step.{i}.latents_out"]).max()) for i in range(4)]
    print(f"{kind}: max|latent| {scale}\n  fed golden latents_in: {fed}\n  chained from z_N: {chained}")
    # The end-to-end latent tolerances of test_sampling_golden. Measured here (no model): 3.8e-6 (DDIM) / 1.5e-5
    # (UniPC, chained); the same steps in float64 (tools/tolerances/measure_f64.py) are 3.7e-6 / 9.5e-6 from the
    # golden, so ~26x margin.
    tol = 1e-4 if kind == "ddim" else 4e-4
    assert max(fed) <= tol and max(chained) <= tol
    # No model involved: a few float32 ulps. Measured at most 2.5e-7 relative (UniPC chained step 2); float64 steps
    # vs the golden 2.2e-7 relative (measure_f64.py).
    assert max(e / m for e, m in zip(fed + chained, scale + scale)) < 2e-6


def test_step_in_scan_with_traced_index(kind_golden, pipe_dir):
    """The whole loop as one lax.scan with a traced step index equals the eager loop."""
    kind, g = kind_golden
    s = scheduler_from_config(pipe_dir / "scheduler", kind, 4)
    eps = jnp.stack([jnp.asarray(g[f"step.{i}.noise_pred_guided"]) for i in range(4)])

    @jax.jit
    def loop(z):
        def body(carry, xs):
            i, e = xs
            _, carry = s.step(carry, i, e)
            return carry, carry.sample
        return jax.lax.scan(body, s.init_carry(z), (jnp.arange(4), eps))[1]
    outs = np.asarray(loop(jnp.asarray(g["z_N"])))
    err = max(float(np.abs(outs[i] - g[f"step.{i}.latents_out"]).max()) for i in range(4))
    print(kind, "scan max abs err", err)
    # measured 3.8e-6 (DDIM) / 1.5e-5 (UniPC), equal to the eager chained loop; float64 3.7e-6 / 9.5e-6 (see above)
    assert err <= (1e-4 if kind == "ddim" else 4e-4)


def test_scheduler_is_a_pytree_argument(pipe_dir):
    """A scheduler is a jit argument (tables are leaves, config static): rebuilding it from the same config, as a
    sampler may do per image, reuses the compiled program; the tables are traced, not baked in."""
    traces = []

    @jax.jit
    def one_step(sched, carry, eps):
        traces.append(1)
        return sched.step(carry, 1, eps)[0]
    z = jnp.ones((1, 4, 2, 2))
    a = scheduler_from_config(pipe_dir / "scheduler", "unipc", 6)
    b = scheduler_from_config(pipe_dir / "scheduler", "unipc", 6)
    ra, rb = one_step(a, a.init_carry(z), z), one_step(b, b.init_carry(z), z)
    assert len(traces) == 1
    np.testing.assert_array_equal(ra, rb)
    c = b.replace(p_ratio=b.p_ratio * 2)  # same structure, other values: no retrace, other result
    rc = one_step(c, c.init_carry(z), z)
    print("p_ratio doubled: max |change| of the step output", float(jnp.abs(ra - rc).max()))
    assert len(traces) == 1 and not np.allclose(ra, rc)     # measured change 0.95 for a unit latent


def test_unipc_order1_without_corrector_equals_ddim(pipe_dir):
    """First-order UniPC (x0 form, predictor only) is DDIM: with trailing spacing and a final sigma of
    abar[0], both visit the same noise levels, so their trajectories must agree."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32)
    eps = [jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32) for _ in range(5)]
    d = scheduler_from_config(pipe_dir / "scheduler", "ddim", 5, timestep_spacing="trailing")
    u = scheduler_from_config(pipe_dir / "scheduler", "unipc", 5, timestep_spacing="trailing", solver_order=1,
                              disable_corrector=list(range(5)), final_sigmas_type="sigma_min")
    np.testing.assert_array_equal(d.timesteps, u.timesteps)
    cd, cu = d.init_carry(z), u.init_carry(z)
    for i in range(5):
        xd, cd = d.step(cd, i, eps[i])
        xu, cu = u.step(cu, i, eps[i])
        err = float(np.abs(np.asarray(xd) - np.asarray(xu)).max())
        scale = max(1.0, float(np.abs(np.asarray(xd)).max()))
        print("step", i, "ddim vs unipc-1 max abs diff", err, "relative", err / scale)
        # Measured at most 2.3e-7 relative (1.5e-5 at |x| = 66); the two schedulers' float32 tables alone, both
        # stepped in float64, differ by 2.8e-7 relative. Was 2e-5 (~90x), now 1e-6.
        assert err < 1e-6 * scale


def test_ddim_eta_needs_noise_and_uses_it(pipe_dir):
    s = scheduler_from_config(pipe_dir / "scheduler", "ddim", 4, eta=1.0)
    z = jnp.ones((1, 4, 2, 2))
    with pytest.raises(ValueError, match="variance_noise"):
        s.step(s.init_carry(z), 0, z)
    a, _ = s.step(s.init_carry(z), 0, z, variance_noise=jnp.zeros_like(z))
    b, _ = s.step(s.init_carry(z), 0, z, variance_noise=jnp.ones_like(z))
    print("eta 1: (out(noise 1) - out(noise 0)) / std_dev - 1:", _rel(np.asarray(b - a), s.std_dev[0]))
    # Measured 0 (|out| <= 1.2, std_dev 0.78): only the rounding of out(noise 1), 1 ulp = 1.2e-7 = 1.5e-7 of
    # std_dev, can move it. Was rtol 1e-5, now 3e-7.
    np.testing.assert_allclose(np.asarray(b - a), s.std_dev[0], rtol=3e-7)
    assert s.std_dev[0] > 0


def test_unsupported_options_raise(pipe_dir):
    # Refusal of every unsupported key value is in test_scheduler_config.py; here the degenerate UniPC tables.
    with pytest.raises(ValueError, match="degenerate"):
        scheduler_from_config(pipe_dir, "unipc", 4, lower_order_final=False)
    with pytest.raises(ValueError, match="degenerate"):
        scheduler_from_config(pipe_dir, "unipc", 4, solver_type="bh1")


class _StatefulUniPC:
    """float64 re-statement of diffusers' stateful UniPC loop (lists of past outputs, a step counter, a runtime
    order), used to check the precomputed-table form for configurations the golden does not cover."""

    def __init__(self, sigmas, order, predict_x0, bh, lower_order_final, disable_corrector=()):
        self.sig = np.asarray(sigmas, np.float64)
        self.order_max, self.x0, self.bh, self.lof = order, predict_x0, bh, lower_order_final
        self.disabled = set(disable_corrector)
        self.outs, self.last, self.lower, self.i, self.this_order = [], None, 0, 0, None

    def _as(self, j):
        a = 1 / np.sqrt(self.sig[j] ** 2 + 1)
        return a, self.sig[j] * a

    def _lam(self, j):
        a, s = self._as(j)
        return np.log(a) - np.log(s) if s > 0 else np.inf

    def _update(self, x, t, s0, older, order, m_new=None):
        a_t, s_t = self._as(t)
        a_s0, s_s0 = self._as(s0)
        h = self._lam(t) - self._lam(s0)
        m0 = self.outs[-1]
        rks = [(self._lam(j) - self._lam(s0)) / h for j in older]
        d1 = [(self.outs[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)]
        hh = -h if self.x0 else h
        phi1 = np.expm1(hh)
        b_h = hh if self.bh == "bh1" else np.expm1(hh)
        rvec = np.array(rks + [1.0])
        R = np.stack([rvec ** k for k in range(order)])
        b, hk, fact = [], phi1 / hh - 1, 1
        for k in range(1, order + 1):
            b.append(hk * fact / b_h)
            fact *= k + 1
            hk = hk / hh - 1 / fact
        b = np.array(b)
        lead = (s_t / s_s0 * x - a_t * phi1 * m0) if self.x0 else (a_t / a_s0 * x - s_t * phi1 * m0)
        scale = a_t * b_h if self.x0 else s_t * b_h
        if m_new is None:  # predictor
            if order == 1:
                return lead
            rho = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            return lead - scale * sum(r * d for r, d in zip(rho, d1))
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        return lead - scale * (sum(r * d for r, d in zip(rho[:-1], d1)) + rho[-1] * (m_new - m0))

    def step(self, x, eps, n):
        i = self.i
        a, s = self._as(i)
        m = (x - s * eps) / a if self.x0 else eps
        if i > 0 and (i - 1) not in self.disabled:
            x = self._update(self.last, i, i - 1, [i - 1 - k for k in range(1, self.this_order)],
                             self.this_order, m_new=m)
        self.outs = (self.outs + [m])[-self.order_max:]
        order = min(self.order_max, n - i) if self.lof else self.order_max
        self.this_order = min(order, self.lower + 1)
        self.last = x
        out = self._update(x, i + 1, i, [i - k for k in range(1, self.this_order)], self.this_order)
        self.lower = min(self.lower + 1, self.order_max)
        self.i += 1
        return out


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(solver_order=3),
    dict(solver_order=3, solver_type="bh1", disable_corrector=[2], final_sigmas_type="sigma_min"),
    dict(solver_order=1),
    dict(predict_x0=False, final_sigmas_type="sigma_min"),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", timestep_spacing="trailing"),
])
def test_unipc_tables_match_stateful_reference(pipe_dir, overrides):
    n = 7
    s = scheduler_from_config(pipe_dir / "scheduler", "unipc", n, **overrides)
    cfg = s.config
    ref = _StatefulUniPC(s.sigmas, cfg["solver_order"], cfg["predict_x0"], cfg["solver_type"],
                         cfg["lower_order_final"], cfg["disable_corrector"])
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1, 4, 4, 4))
    carry = s.init_carry(jnp.asarray(z, jnp.float32))
    x_ref = z
    worst = 0.0
    for i in range(n):
        eps = rng.standard_normal(z.shape)
        out, carry = s.step(carry, i, jnp.asarray(eps, jnp.float32))
        x_ref = ref.step(x_ref, eps, n)
        worst = max(worst, float(np.abs(np.asarray(out) - x_ref).max() / max(1.0, np.abs(x_ref).max())))
    print(overrides, "orders", s.orders.tolist(), "max rel err vs float64 stateful reference", worst)
    assert worst < 2e-5


ZSNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind,overrides", [
    ("ddim", dict(ZSNR, prediction_type="v_prediction")),
    ("unipc", ZSNR),                               # sigma 4096, alpha 2^-12 at t=999: x0 = (x - eps) * 4096
    ("lcm", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")),
    ("lcm", {}),                                   # c_skip = 2.5e-9 at t=999: flushed to zero in fp16
])
def test_step_math_is_float32_for_half_precision_latents(pipe_dir, kind, overrides, dtype):
    """With bf16/fp16 latents every step computes in float32: its output is the float32 step of the same
    (upcast) inputs, rounded once to the latent dtype, bit for bit, and finite; the float32 carry fields
    (UniPC history, LCM denoised) are exactly the float32 ones."""
    s = scheduler_from_config(pipe_dir / "scheduler", kind, 4, **overrides)
    assert s.timesteps[0] == 999
    rng = np.random.default_rng(3)
    carry = s.init_carry(jnp.asarray(rng.standard_normal((1, 4, 4, 4)), dtype))
    step = jax.jit(s.step)
    worst = 0.0
    for i in range(4):
        eps = jnp.asarray(rng.standard_normal((1, 4, 4, 4)), dtype)
        noise = jnp.asarray(rng.standard_normal((1, 4, 4, 4)), jnp.float32)
        args = (noise,) if s.needs_step_noise else ()
        carry32 = carry._replace(sample=carry.sample.astype(jnp.float32))
        out32, next32 = step(carry32, i, eps.astype(jnp.float32), *args)
        out, carry = step(carry, i, eps, *args)
        assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out32.astype(dtype), np.float32))
        for a, b in zip(carry[1:], next32[1:]):
            assert a.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        worst = max(worst, float(np.abs(np.asarray(out, np.float32) - np.asarray(out32)).max()
                                 / max(1.0, float(np.abs(np.asarray(out32)).max()))))
    print(kind, overrides, jnp.dtype(dtype).name, "max |low - fp32| / max(1, |x|):", worst)
    # The only difference is the final rounding to the latent dtype: half an ulp, at most 2^-8 (bf16) / 2^-11 (fp16)
    # of |x| (measured up to 3.5e-3 = 0.88 * 2^-8 for bf16 and 4.3e-4 = 0.88 * 2^-11 for fp16).
    assert worst <= (2.0 ** -8 if dtype == jnp.bfloat16 else 2.0 ** -10)


def test_zero_snr_unipc_reproduces_the_colorization_golden(golden_dir):
    """UniPC with the zero-SNR trailing config (sigma 4096 at t=999, x0 amplified 4096x): sigmas, and every step
    from the recorded latents and guided noise predictions (fed, and chained from z_N)."""
    gray = golden_dir / "tiny_pipeline_gray"
    g = load_file(str(gray / "golden.safetensors"))
    s = scheduler_from_config(gray / "scheduler", "unipc", 4)
    assert s.timesteps.tolist() == g["scheduler_timesteps"].tolist() == [999, 749, 499, 249]
    sig_err = float(np.abs(s.sigmas / np.where(g["scheduler_sigmas"] == 0, 1, g["scheduler_sigmas"]) - 1)
                    [g["scheduler_sigmas"] > 0].max())
    print("sigmas", s.sigmas.tolist(), "golden", g["scheduler_sigmas"].tolist())
    # torch's float32 sqrt is not correctly rounded (sqrt(2^24 - 1) -> 4096.0, and in the zero-SNR rescale the
    # abar are 1 ulp off, see test_scheduler_config): measured 3.6e-7 relative, a few ulps.
    assert sig_err <= 6e-7 and s.sigmas[-1] == 0.0
    step = jax.jit(s.step)
    fed, chained = [], []
    carry = s.init_carry(jnp.asarray(g["add_noise.1.out"]))
    fed_carry = carry
    for i in range(4):
        eps = jnp.asarray(g[f"step.{i}.noise_pred_guided"])
        want = g[f"step.{i}.latents_out"]
        out, fed_carry = step(fed_carry._replace(sample=jnp.asarray(g[f"step.{i}.latents_in"])), i, eps)
        fed.append(float(np.abs(np.asarray(out) - want).max() / np.abs(want).max()))
        out, carry = step(carry, i, eps)
        chained.append(float(np.abs(np.asarray(out) - want).max() / np.abs(want).max()))
    print(f"sigma rel err {sig_err:.3g}; max|latent| {float(np.abs(want).max()):.0f}; rel err fed {fed}, "
          f"chained {chained}")
    # The golden's own float32-vs-float64 distance is 2e-6 relative over the whole run (README "Verification") and
    # 5.0e-7 for these steps alone (float64 steps vs the golden, tools/tolerances/measure_f64.py); measured 5.7e-7.
    assert max(fed + chained) <= 2e-6
