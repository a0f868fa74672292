"""One PASD denoising step (ControlNet + PASD UNet, classifier-free guidance as one batch of 2B) at given sizes.

Reports time per step, peak device memory, XLA FLOPs and the attention kernel each layer was given.

    python bench/bench_step.py --model sd15 --sizes 512 768 --dtype bfloat16 --out step.json   # GPU
    python bench/bench_step.py --model tiny --sizes 64 --dtype float32 --repeats 2              # CPU smoke
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import dtype_of, emit, environment, load_config, peak_memory_bytes, random_params, time_fn  # noqa: E402
from pasd_jax.convert import build_module  # noqa: E402
from pasd_jax.models import attention  # noqa: E402
from pasd_jax.models.config import controlnet_config_from_unet  # noqa: E402


def build(model: str, variant: str, dtype):
    ucfg = load_config(model, "unet")
    unet = build_module("unet", ucfg, variant=variant, dtype=dtype, param_dtype=dtype)
    cn = build_module("controlnet", controlnet_config_from_unet(ucfg), dtype=dtype, param_dtype=dtype)
    return unet, random_params(unet, 0, dtype, "unet"), cn, random_params(cn, 0, dtype, "controlnet")


def make_step(unet, cn, guidance: float = 9.0):
    @jax.jit
    def step(unet_params, cn_params, latents, t, context, cond):
        x = jnp.concatenate([latents, latents])
        image = jnp.concatenate([cond, cond])
        _, down, mid = cn.apply({"params": cn_params}, x, t, context, image, 1.0)
        eps = unet.apply({"params": unet_params}, x, t, context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)
        uncond, text = jnp.split(eps, 2)
        return uncond + guidance * (text - uncond)

    return step


def bench_size(step, unet_params, cn_params, size: int, batch: int, ctx_dim: int, dtype, repeats: int) -> dict:
    lat = size // 8
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    latents = jax.random.normal(keys[0], (batch, 4, lat, lat), jnp.float32)
    context = jax.random.normal(keys[1], (2 * batch, 77, ctx_dim), dtype)
    cond = jax.random.uniform(keys[2], (batch, 3, size, size), dtype)
    t = jnp.full((2 * batch,), 500.0)
    args = (unet_params, cn_params, latents, t, context, cond)
    with attention.record_kernels() as log:
        lowered = step.lower(*args)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    timing = time_fn(lambda: jax.block_until_ready(compiled(*args)), repeats=repeats)
    kernels = collections.Counter(entry["kernel"] for entry in log)
    return {"size": size, "batch": batch, "cfg_batch": 2 * batch, **timing,
            "ms_per_step": 1000 * timing["median_s"], "flops": (cost or {}).get("flops"),
            "peak_memory_bytes": peak_memory_bytes(), "attention_kernels": dict(kernels),
            "attention_layers": log}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--variant", default="pasd", choices=["pasd", "pasd_light"])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--attention", default="auto", choices=list(attention.IMPLS))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dtype = dtype_of(a.dtype)
    with attention.attention_impl(a.attention):
        unet, up, cn, cp = build(a.model, a.variant, dtype)
        step = make_step(unet, cn)
        ctx_dim = unet.config.cross_attention_dim
        results = [bench_size(step, up, cp, s, a.batch, ctx_dim, dtype, a.repeats) for s in a.sizes]
    emit({"benchmark": "pasd_step", "model": a.model, "variant": a.variant, "dtype": a.dtype,
          "attention": a.attention, "env": environment(), "results": results}, a.out)


if __name__ == "__main__":
    main()
