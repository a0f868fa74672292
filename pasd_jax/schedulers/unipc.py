"""UniPC multistep (Zhao et al. 2023) with the semantics of diffusers 0.29.2 `UniPCMultistepScheduler`.

What the official `test_pasd.py` samples with: bh2, order 2, predictor + corrector, x0 prediction, the last step
of order 1 (`lower_order_final`) and a final sigma of zero. Every coefficient depends only on the step index, so the
host precomputes them once (float32, with the same operations as the PyTorch scheduler) and `step` is a pure
function whose carry holds the history of converted model outputs and the last sample. Steps must run in order
i = 0 .. N-1 starting from `init_carry`.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import struct

from pasd_jax.schedulers import schedule as sch
from pasd_jax.schedulers.prediction import compute_dtype, dynamic_threshold

F32 = np.float32


class UniPCCarry(NamedTuple):
    """State between steps: the current sample, the sample before the last predictor, and the last
    `solver_order` converted model outputs (oldest first, most recent last; zeros before they exist)."""
    sample: jnp.ndarray
    last_sample: jnp.ndarray
    model_outputs: jnp.ndarray  # [solver_order, *sample.shape]


@struct.dataclass
class UniPCScheduler:
    """Precomputed UniPC tables ([N] or [N, solver_order - 1]). A pytree: arrays are leaves, the config is static.

    Predictor of step i:  x' = p_ratio*x - p_m0*m0 - p_bh * sum_k p_rho[k] * (m_k - m0) / p_rk[k]
    Corrector of step i:  x  = c_ratio*x_last - c_m0*m0 - c_bh * (sum_k c_rho[k] * (m_k - m0) / c_rk[k]
                                                              + c_rho_last * (m_new - m0))
    where m0 is the most recent stored converted output and m_k the k-th older one (unused terms have rho 0, rk 1).
    """
    timesteps: np.ndarray     # [N] int
    sigmas: np.ndarray        # [N + 1] float32 (last: final sigma)
    alphas_cumprod: np.ndarray
    conv_alpha: np.ndarray    # [N] alpha_t, sigma_t of step i, for the model-output conversion
    conv_sigma: np.ndarray
    p_ratio: np.ndarray
    p_m0: np.ndarray
    p_bh: np.ndarray
    p_rho: np.ndarray         # [N, K-1]
    p_rk: np.ndarray          # [N, K-1]
    use_corrector: np.ndarray # [N] bool
    c_ratio: np.ndarray
    c_m0: np.ndarray
    c_bh: np.ndarray
    c_rho: np.ndarray         # [N, K-1]
    c_rk: np.ndarray          # [N, K-1]
    c_rho_last: np.ndarray    # [N]
    orders: np.ndarray        # [N] int: predictor order of step i (for inspection and tests)
    config: Mapping[str, Any] = struct.field(pytree_node=False)

    kind = "unipc"
    init_noise_sigma = 1.0

    @property
    def num_inference_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    @property
    def solver_order(self) -> int:
        return int(self.config["solver_order"])

    needs_step_noise = False

    @property
    def step_noise_used(self) -> np.ndarray:
        """[N] bool: UniPC is deterministic, no step takes noise."""
        return np.zeros(self.num_inference_steps, bool)

    def init_carry(self, sample: jnp.ndarray) -> UniPCCarry:
        dtype = compute_dtype(sample.dtype)
        zeros = jnp.zeros((self.solver_order,) + tuple(sample.shape), dtype)
        return UniPCCarry(sample=sample, last_sample=sample.astype(dtype), model_outputs=zeros)

    def convert_model_output(self, i: Any, sample: jnp.ndarray, model_output: jnp.ndarray) -> jnp.ndarray:
        """The network output as the solver's variable: x0 (predict_x0) or epsilon."""
        alpha = jnp.asarray(self.conv_alpha)[i].astype(sample.dtype)
        sigma = jnp.asarray(self.conv_sigma)[i].astype(sample.dtype)
        prediction = self.config["prediction_type"]
        if self.config["predict_x0"]:
            if prediction == "epsilon":
                x0 = (sample - sigma * model_output) / alpha
            elif prediction == "sample":
                x0 = model_output
            else:  # v_prediction
                x0 = alpha * sample - sigma * model_output
            if self.config["thresholding"]:  # diffusers thresholds the data prediction only
                x0 = dynamic_threshold(x0, float(self.config["dynamic_thresholding_ratio"]),
                                       float(self.config["sample_max_value"]))
            return x0
        if prediction == "epsilon":
            return model_output
        if prediction == "sample":
            return (sample - alpha * model_output) / sigma
        return alpha * model_output + sigma * sample  # v_prediction

    def step(self, carry: UniPCCarry, i: Any, model_output: jnp.ndarray) -> tuple[jnp.ndarray, UniPCCarry]:
        """Corrector for the sample of step i (from step i-1's prediction), then the predictor to step i+1; in
        float32 whatever the sample dtype, returned in the sample's dtype."""
        out_dtype = carry.sample.dtype
        dtype = compute_dtype(out_dtype)
        x = carry.sample.astype(dtype)
        model_output = model_output.astype(dtype)
        take = lambda table: jnp.asarray(table)[i].astype(dtype)
        converted = self.convert_model_output(i, x, model_output)
        hist = carry.model_outputs
        n_older = self.solver_order - 1

        # Corrector (UniC): history before the shift; m0 = output of step i-1.
        m0 = hist[-1]
        c_rho, c_rk = take(self.c_rho), take(self.c_rk)
        corr = take(self.c_rho_last) * (converted - m0)
        if n_older:
            terms = [c_rho[k] * ((hist[-(k + 2)] - m0) / c_rk[k]) for k in range(n_older)]
            corr = sum(terms[1:], terms[0]) + corr
        corrected = take(self.c_ratio) * carry.last_sample - take(self.c_m0) * m0 - take(self.c_bh) * corr
        x = jnp.where(jnp.asarray(self.use_corrector)[i], corrected, x)

        # Predictor (UniP): history after the shift; m0 = output of step i.
        hist = jnp.concatenate([hist[1:], converted[None]], axis=0)
        m0 = converted
        x_next = take(self.p_ratio) * x - take(self.p_m0) * m0
        if n_older:
            p_rho, p_rk = take(self.p_rho), take(self.p_rk)
            terms = [p_rho[k] * ((hist[-(k + 2)] - m0) / p_rk[k]) for k in range(n_older)]
            x_next = x_next - take(self.p_bh) * sum(terms[1:], terms[0])
        x_next = x_next.astype(out_dtype)
        return x_next, UniPCCarry(sample=x_next, last_sample=x, model_outputs=hist)

    def index_for_timestep(self, timestep: int) -> int:
        """diffusers 0.29.2 lookup: the (second, if repeated) match in the inference schedule, else the LAST index."""
        matches = np.nonzero(np.asarray(self.timesteps) == int(timestep))[0]
        if len(matches) == 0:
            return self.num_inference_steps - 1
        return int(matches[1] if len(matches) > 1 else matches[0])

    def official_add_noise_coefficients(self, timestep: int) -> tuple[np.float32, np.float32]:
        """(signal, noise) multipliers of diffusers 0.29.2 UniPC `add_noise`: sigma of the looked-up schedule step.

        A timestep that is not in the inference schedule silently falls back to the last step (spec 4.5)."""
        alpha, sigma = sch.sigma_to_alpha_sigma(np.asarray(self.sigmas)[self.index_for_timestep(timestep)])
        return F32(alpha), F32(sigma)


def _lambda(sigma: np.float32) -> np.float32:
    """log-SNR half: log(alpha_t) - log(sigma_t), float32 (+inf at sigma 0)."""
    alpha_t, sigma_t = sch.sigma_to_alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return F32(np.log(alpha_t) - np.log(sigma_t))


def _bh_coefficients(sigmas: np.ndarray, t_idx: int, s0_idx: int, older_idx: list[int], order: int,
                     predict_x0: bool, solver_type: str) -> dict[str, Any]:
    """Scalars of one UniP/UniC update, as diffusers' `multistep_uni_{p,c}_bh_update` computes them (float32)."""
    alpha_t, sigma_t = sch.sigma_to_alpha_sigma(sigmas[t_idx])
    alpha_s0, sigma_s0 = sch.sigma_to_alpha_sigma(sigmas[s0_idx])
    lambda_t, lambda_s0 = _lambda(sigmas[t_idx]), _lambda(sigmas[s0_idx])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        h = F32(lambda_t - lambda_s0)
        rks = [F32((_lambda(sigmas[j]) - lambda_s0) / h) for j in older_idx]
        hh = F32(-h) if predict_x0 else h
        h_phi_1 = F32(np.expm1(hh))
        h_phi_k = F32(h_phi_1 / hh - F32(1))
        b_h = hh if solver_type == "bh1" else F32(np.expm1(hh))
        rk_vec = np.asarray(rks + [F32(1)], dtype=F32)
        rows, b = [], []
        factorial = 1
        for k in range(1, order + 1):
            rows.append(rk_vec ** (k - 1))
            b.append(F32(F32(h_phi_k * F32(factorial)) / b_h))
            factorial *= k + 1
            h_phi_k = F32(h_phi_k / hh - F32(1 / factorial))
    if predict_x0:
        ratio, m0, bh = F32(sigma_t / sigma_s0), F32(alpha_t * h_phi_1), F32(alpha_t * b_h)
    else:
        ratio, m0, bh = F32(alpha_t / alpha_s0), F32(sigma_t * h_phi_1), F32(sigma_t * b_h)
    return {"ratio": ratio, "m0": m0, "bh": bh, "rks": rks, "R": np.stack(rows).astype(F32),
            "b": np.asarray(b, dtype=F32)}


def make_unipc(config: Mapping[str, Any], num_inference_steps: int) -> UniPCScheduler:
    """Build the UniPC tables from a resolved config (see `config.effective_config`)."""
    sch.check_config(config, "unipc")
    solver_type = config["solver_type"]
    if solver_type in ("midpoint", "heun", "logrho"):
        solver_type = "bh2"  # diffusers maps these to bh2
    order_max = int(config["solver_order"])
    predict_x0 = bool(config["predict_x0"])

    big_t = int(config["num_train_timesteps"])
    alphas_cumprod = sch.alphas_cumprod_from_betas(sch.make_betas(config))
    if config["rescale_betas_zero_snr"]:
        alphas_cumprod[-1] = F32(2.0 ** -24)  # as diffusers: keeps the first sigma finite
    all_sigmas = np.sqrt((F32(1) - alphas_cumprod) / alphas_cumprod).astype(F32)
    if config["use_karras_sigmas"]:
        step_sigmas, timesteps = sch.karras_sigmas(all_sigmas, num_inference_steps)
        sigma_min = step_sigmas[-1]
    else:
        timesteps = sch.spaced_timesteps(num_inference_steps, spacing=config["timestep_spacing"],
                                         num_train_timesteps=big_t, steps_offset=config["steps_offset"],
                                         multistep=True)
        step_sigmas = all_sigmas[timesteps]
        sigma_min = all_sigmas[0]
    n = len(timesteps)
    sigma_last = F32(0) if config["final_sigmas_type"] == "zero" else sigma_min
    sigmas = np.concatenate([step_sigmas, [sigma_last]]).astype(F32)

    # Orders, as the step counter of diffusers evolves from a fresh set_timesteps.
    orders = np.zeros(n, dtype=np.int32)
    for i in range(n):
        order = min(order_max, n - i) if config["lower_order_final"] else order_max
        orders[i] = min(order, min(i, order_max) + 1)
    disabled = {int(j) for j in config.get("disable_corrector", ())}

    k_old = max(order_max - 1, 1)  # order 1 keeps one unused column so every table has a fixed rank
    tables = {name: np.zeros(n, F32) for name in
              ("p_ratio", "p_m0", "p_bh", "c_ratio", "c_m0", "c_bh", "c_rho_last")}
    for name in ("p_rho", "c_rho"):
        tables[name] = np.zeros((n, k_old), F32)
    for name in ("p_rk", "c_rk"):
        tables[name] = np.ones((n, k_old), F32)
    use_corrector = np.zeros(n, dtype=bool)

    for i in range(n):
        p = int(orders[i])
        c = _bh_coefficients(sigmas, i + 1, i, [i - k for k in range(1, p)], p, predict_x0, solver_type)
        tables["p_ratio"][i], tables["p_m0"][i], tables["p_bh"][i] = c["ratio"], c["m0"], c["bh"]
        if p >= 2:
            rhos = np.asarray([0.5], F32) if p == 2 else np.linalg.solve(c["R"][:-1, :-1], c["b"][:-1]).astype(F32)
            tables["p_rho"][i, :p - 1] = rhos
            tables["p_rk"][i, :p - 1] = c["rks"]

        if i > 0 and (i - 1) not in disabled:
            use_corrector[i] = True
            q = int(orders[i - 1])
            c = _bh_coefficients(sigmas, i, i - 1, [i - 1 - k for k in range(1, q)], q, predict_x0, solver_type)
            tables["c_ratio"][i], tables["c_m0"][i], tables["c_bh"][i] = c["ratio"], c["m0"], c["bh"]
            rhos = np.asarray([0.5], F32) if q == 1 else np.linalg.solve(c["R"], c["b"]).astype(F32)
            tables["c_rho"][i, :q - 1] = rhos[:-1]
            tables["c_rk"][i, :q - 1] = c["rks"]
            tables["c_rho_last"][i] = rhos[-1]

    for name, table in tables.items():
        if not np.all(np.isfinite(table)) or (name.endswith("_rk") and np.any(table == 0)):
            raise ValueError(f"UniPC coefficient table {name} is degenerate for this config (diffusers would give "
                             f"NaN): a step onto sigma 0 needs order 1 and bh2; use lower_order_final=True or "
                             f"final_sigmas_type='sigma_min'")
    return UniPCScheduler(timesteps=timesteps, sigmas=sigmas, alphas_cumprod=alphas_cumprod,
                          conv_alpha=sch.sigma_to_alpha_sigma(sigmas[:n])[0],
                          conv_sigma=sch.sigma_to_alpha_sigma(sigmas[:n])[1],
                          use_corrector=use_corrector, orders=orders, config=sch.freeze_config(config), **tables)
