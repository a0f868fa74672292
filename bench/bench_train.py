"""PASD training throughput: the full train step (VAE encode, CLIP, ControlNet + PASD UNet forward/backward, AdamW)
at SD1.5 sizes with random weights, per device, with and without per-block rematerialisation.

Reports per case (batch per device, remat): seconds per step (median), samples/s, peak device memory, XLA's
compile-time memory analysis, and MFU = model FLOPs / step time / 989 TFLOP/s (H100/H200 dense bf16). Model FLOPs
are XLA's cost analysis of the step *without* remat at the same batch, plus the fused-attention FLOPs XLA cannot see
(cuDNN flash attention is a custom call: 4*B*H*Lq*Lk*D per forward, x3 for forward + backward, x1 for the frozen
CLIP). Data loading is excluded (one fixed uint8 batch on the device).

    python bench/bench_train.py --out train.json                                      # GPU: sd15, bf16
    python bench/bench_train.py --model tiny --dtype float32 --resolution 64 --cases 2 2:remat --steps 2  # CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import ASSETS, emit, environment, peak_memory_bytes, random_params, time_fn
from configs import pasd_v1
from pasd_jax.models import attention
from pasd_jax.models.controlnet import controlnet_params_from_unet
from pasd_jax.train import layout as layout_lib
from pasd_jax.train import loop, setup
from pasd_jax import sharding
from pasd_jax.sharding import trainable_split
from pasd_jax.models.bundle import Models
from pasd_jax.runs.models import build_models
from pasd_jax.train.step import init_state, make_optimizer, make_train_step

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16


def run_config(model: str, dtype: str, variant: str, resolution: int):
    c = pasd_v1.get_config()
    c.data.crop_size = resolution
    for kind in ("unet", "vae", "text_encoder"):
        c.model[f"{kind}_config"] = str(ASSETS / model / kind)
    c.model.compute_dtype, c.model.variant = dtype, variant
    c.loader.tokenizer = str(ASSETS / "sd15" / "tokenizer")
    return c


def device_params(models: Models, names: tuple[str, ...], dtype) -> tuple[dict, dict]:
    """Random trainable (fp32) and frozen (compute dtype) params on the device, drawn on the host (no init program
    to compile); speed does not depend on the values."""
    cast = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x.astype(dtype), t))
    unet = random_params(models.unet, 0, jnp.float32, "unet")
    paca, sd = trainable_split.split_unet(unet, names)
    controlnet = controlnet_params_from_unet(unet, random_params(models.controlnet, 0, jnp.float32, "controlnet"))
    frozen = {"unet": cast(sd), "vae": random_params(models.vae, 0, dtype, "vae"),
              "text_encoder": random_params(models.text_encoder, 0, dtype, "text_encoder")}
    return {"controlnet": controlnet, "unet": paca}, frozen


def attention_flops(records: list[dict], batch: int) -> float:
    """FLOPs of the cuDNN attention calls (custom calls, invisible to XLA's cost analysis) of one train step."""
    total = 0.0
    for r in records:
        if r["kernel"] != "cudnn":
            continue
        fwd = 4.0 * batch * r["heads"] * r["q_len"] * r["kv_len"] * r["head_dim"]
        total += fwd * (1 if r["q_len"] == r["kv_len"] == 77 else 3)  # CLIP self-attention: forward only
    return total


def bench_case(model: str, dtype: str, variant: str, resolution: int, batch: int, remat: bool,
               steps: int) -> dict:
    config = run_config(model, dtype, variant, resolution)
    names = tuple(config.model.trainable)
    configs = setup.model_config_dicts(config.model)
    models = build_models(configs, variant, jnp.dtype(dtype), remat)
    diffusion = loop.make_diffusion(config)
    optim = layout_lib.freeze(config.optim)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = tuple((r, tuple(a)) for r, a in config.sharding.rules)
    lay = layout_lib.make_layout(models, names, dtype, optim, mesh, rules, config.sharding.min_size)
    res = config.data.crop_size
    with attention.record_kernels() as records:
        compiled = layout_lib.compile_step(models, diffusion, lay, optim, (1, batch, res))
    flops = (compiled.cost_analysis() or {}).get("flops")
    if remat:  # model FLOPs: the same step without recomputation
        plain = build_models(configs, variant, jnp.dtype(dtype), False)
        tx, sched = make_optimizer(dict(optim))
        lowered = jax.jit(make_train_step(plain, diffusion, tx, sched)).lower(
            lay.abstract_state(), lay.abstract_frozen(),
            layout_lib.batch_shapes(lay, 1, batch, res, models.text_encoder.config.max_position_embeddings))
        flops_model = (lowered.cost_analysis() or {}).get("flops")
    else:
        flops_model = flops
    mem = compiled.memory_analysis()

    trainable, frozen = device_params(models, names, jnp.dtype(dtype))
    tx, _ = make_optimizer(dict(optim))
    state = jax.jit(lambda p, k: init_state(p, tx, k), out_shardings=lay.state_sh)(trainable,
                                                                                    jax.random.PRNGKey(0))
    del trainable
    frozen = jax.device_put(frozen, lay.frozen_sh)
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (1, batch, res, res, 3), dtype=np.uint8)
    batch_arrays = jax.device_put({"hq": img(), "lq": img(), "input_ids": rng.integers(
        0, 49406, (1, batch, 77)).astype(np.int32)}, lay.batch_sh)
    box = {"state": state}

    def one_step():
        box["state"], metrics = compiled(box["state"], frozen, batch_arrays)
        return jax.block_until_ready(metrics["loss"])

    timing = time_fn(one_step, repeats=steps, warmup=2)
    att = attention_flops(records, batch)
    total = (flops_model or 0.0) + att
    sec = timing["median_s"]
    return {"batch_per_device": batch, "remat": remat, "resolution": res, **timing,
            "samples_per_s": batch / sec, "peak_memory_bytes": peak_memory_bytes(),
            "compiled_memory": None if mem is None else {
                k: getattr(mem, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                             "temp_size_in_bytes", "alias_size_in_bytes")},
            "xla_flops": flops, "xla_flops_without_remat": flops_model, "cudnn_attention_flops": att,
            "model_flops": total, "mfu": total / sec / PEAK_BF16_FLOPS if total else None,
            "attention_kernels": sorted({r["kernel"] for r in records}), "loss": float(one_step())}


def parse_case(text: str) -> tuple[int, bool]:
    batch, _, flag = text.partition(":")
    if flag not in ("", "remat"):
        raise SystemExit(f"case {text!r}: expected BATCH or BATCH:remat")
    return int(batch), flag == "remat"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--variant", default="pasd", choices=["pasd", "pasd_light"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--cases", nargs="+", default=["16", "32:remat"],
                   help="batch per device, optionally ':remat' (at most three: each is a compile)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="one process per case: its own peak memory, and an OOM does not end the run")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    results = []
    for case in a.cases:
        batch, remat = parse_case(case)
        if not a.isolate:
            results.append(bench_case(a.model, a.dtype, a.variant, a.resolution, batch, remat, a.steps))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "case.json")
            cmd = [sys.executable, __file__, "--model", a.model, "--variant", a.variant, "--dtype", a.dtype,
                   "--resolution", str(a.resolution), "--cases", case, "--steps", str(a.steps), "--no-isolate",
                   "--out", out]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            done = os.path.exists(out)
            if done:
                with open(out) as f:
                    results.extend(json.load(f)["results"])
        if not done:
            oom = "RESOURCE_EXHAUSTED" in proc.stderr or "out of memory" in proc.stderr.lower()
            results.append({"batch_per_device": batch, "remat": remat, "error": "out of memory" if oom else
                            proc.stderr[-2000:]})
    emit({"benchmark": "pasd_train_step", "model": a.model, "variant": a.variant, "dtype": a.dtype,
          "resolution": a.resolution,
          "env": environment(), "results": results}, a.out)


if __name__ == "__main__":
    main()
