"""One PASD denoising step (ControlNet + PASD UNet, classifier-free guidance as one batch of 2B) at given sizes.

Reports time per step, peak device memory, the process's peak resident memory (weights + compile + run), XLA FLOPs
and temporaries, and the attention kernel each layer was given. The step is compiled before the weights exist
(from their shapes), so the compiler's working memory and the weights are never resident at once.

    python bench/bench_step.py --model sd15 --sizes 512 768 --dtype bfloat16 --out step.json    # GPU
    python bench/bench_step.py --model sd15 --sizes 256 512 --dtype float32 --compare-official  # CPU, vs PyTorch
    python bench/bench_step.py --model tiny --sizes 64 --dtype float32 --repeats 2               # CPU smoke

`--weights DIR` loads an official-layout PASD checkpoint (unet/ + controlnet/) through the converter and its cache
instead of drawing random weights, so the peak covers loading too; `--make-checkpoint DIR` writes one with random
SD1.5-size weights. `--compare-official` runs ours and the official PyTorch step (bench/official_baseline.py) in
alternating fresh processes on the same CPUs (see bench/step_compare.py).
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from bench.common import dtype_of, emit, environment, load_config, peak_memory_bytes, time_fn  # noqa: E402
from pasd_jax.convert import build_module  # noqa: E402
from pasd_jax.convert.io import aligned_copy  # noqa: E402
from pasd_jax.models import attention  # noqa: E402
from pasd_jax.models.config import controlnet_config_from_unet  # noqa: E402
from pasd_jax.models.host_init import host_params  # noqa: E402
from pasd_jax.sampling import xla_options  # noqa: E402
from pasd_jax.sampling.denoise import make_guided_eps  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def stage(msg: str) -> None:
    print(f"[bench_step {time.strftime('%H:%M:%S')}] {msg} (rss {rss_bytes() / 2**30:.2f} GiB)", file=sys.stderr,
          flush=True)


def build(model: str, variant: str, dtype):
    ucfg = load_config(model, "unet")
    unet = build_module("unet", ucfg, variant=variant, dtype=dtype, param_dtype=dtype)
    cn = build_module("controlnet", controlnet_config_from_unet(ucfg), dtype=dtype, param_dtype=dtype)
    return unet, cn


def place_random(module, seed: int, dtype, stream: str):
    """Random weights drawn on the host and placed leaf by leaf: each leaf is cast into a 64-byte aligned buffer
    (which the CPU device aliases) and the drawn copy dropped, so about one tree is resident, not two or three."""
    flat = flatten_dict(host_params(module, seed, stream=stream))
    out = {}
    for path in list(flat):
        out[path] = jax.device_put(aligned_copy(flat.pop(path), jnp.dtype(dtype)))
    return unflatten_dict(out)


def load_checkpoint_params(folder: str, dtype):
    from pasd_jax.convert.release import load_checkpoint

    pasd = load_checkpoint(folder, dtype=dtype, param_dtype=dtype)
    return pasd["unet"], pasd["controlnet"]


def make_checkpoint(model: str, variant: str, folder: str) -> None:
    """An official-layout PASD checkpoint with random weights (fp32 safetensors), for the loading measurement."""
    from pasd_jax.convert.folders import to_pytorch

    unet, cn = build(model, variant, jnp.float32)
    for sub, module in (("unet", unet), ("controlnet", cn)):
        stage(f"writing random {sub} weights to {folder}/{sub}")
        to_pytorch(module, host_params(module, 0, stream=sub), os.path.join(folder, sub))


def make_base(model: str, folder: str) -> None:
    """A diffusers-layout SD base with random VAE and text-encoder weights beside the shipped tokenizer, scheduler
    and UNet configs: with `--make-checkpoint`, everything `pasd-sample --ckpt --base` reads, for the end-to-end
    memory measurement without a download."""
    import shutil

    from pasd_jax.convert.folders import to_pytorch

    assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pasd_jax", "assets", model)
    for sub in ("tokenizer", "scheduler", "unet"):
        if os.path.isdir(os.path.join(assets, sub)):
            shutil.copytree(os.path.join(assets, sub), os.path.join(folder, sub), dirs_exist_ok=True)
    for kind in ("vae", "text_encoder"):
        module = build_module(kind, load_config(model, kind), dtype=jnp.float32, param_dtype=jnp.float32)
        stage(f"writing random {kind} weights to {folder}/{kind}")
        to_pytorch(module, host_params(module, 0, stream=kind), os.path.join(folder, kind))


def make_step(unet, cn, guidance: float = 9.0, share_prefix: bool = True):
    """The sampler's guided noise estimate (`sampling.denoise.make_guided_eps`): one latent and LQ image, the
    [negative, positive] text pair. `share_prefix=False` repeats the latent and image first (the official
    pipeline's torch.cat([x] * 2)), so the models run their text-independent prefix twice."""
    eps_fn = make_guided_eps(unet, cn)

    @jax.jit
    def step(unet_params, cn_params, latents, t, context, cond):
        n = latents.shape[0]
        pairs = context.reshape((n, 2) + context.shape[1:])
        if not share_prefix:
            latents, cond = (jnp.repeat(a, 2, axis=0) for a in (latents, cond))
            eps = eps_fn({"unet": unet_params, "controlnet": cn_params}, latents, t, pairs.reshape(
                (2 * n, 1) + context.shape[1:]), cond, jnp.float32(1.0), jnp.float32(1.0)).reshape(
                    (n, 2) + latents.shape[1:])
            return eps[:, 0] + guidance * (eps[:, 1] - eps[:, 0])
        return eps_fn({"unet": unet_params, "controlnet": cn_params}, latents, t, pairs, cond,
                      jnp.float32(guidance), jnp.float32(1.0))

    return step


def step_inputs(size: int, batch: int, ctx_dim: int, dtype):
    """(latents [B], t, contexts [2B] interleaved per image as [negative, positive], LQ images [B])."""
    lat = size // 8
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    return (jax.random.normal(keys[0], (batch, 4, lat, lat), jnp.float32),
            jnp.int32(500),
            jax.random.normal(keys[1], (2 * batch, 77, ctx_dim), dtype),
            jax.random.uniform(keys[2], (batch, 3, size, size), dtype))


def trim_heap() -> None:
    """Hand freed heap pages (the compiler's working memory) back to the OS, so they leave the RSS (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compile_size(step, abstract_params, size: int, batch: int, ctx_dim: int, dtype, options: dict) -> dict:
    inputs = jax.eval_shape(lambda: step_inputs(size, batch, ctx_dim, dtype))
    stage(f"compiling the {size}x{size} step")
    t0 = time.perf_counter()
    with attention.record_kernels() as log:
        lowered = step.lower(*abstract_params, *inputs)
    compiled = lowered.compile(compiler_options=options or None)
    compile_s = time.perf_counter() - t0
    trim_heap()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    stage(f"compiled the {size}x{size} step in {compile_s:.0f} s")
    return {"compiled": compiled, "compile_s": compile_s, "flops": (cost or {}).get("flops"),
            "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "log": log}


def run_size(prog: dict, params, size: int, batch: int, ctx_dim: int, dtype, repeats: int) -> dict:
    args = (*params, *step_inputs(size, batch, ctx_dim, dtype))
    stage(f"running the {size}x{size} step: 1 warm-up + {repeats}")
    load0 = os.getloadavg()[0]
    timing = time_fn(lambda: jax.block_until_ready(prog["compiled"](*args)), repeats=repeats)
    log = prog["log"]
    kernels = collections.Counter(entry["kernel"] for entry in log)
    return {"size": size, "batch": batch, "cfg_batch": 2 * batch, **timing,
            "ms_per_step": 1000 * timing["median_s"], "compile_s": prog["compile_s"], "flops": prog["flops"],
            "xla_temp_bytes": prog["temp_bytes"], "peak_memory_bytes": peak_memory_bytes(),
            "rss_after_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(),
            "load_avg": [load0, os.getloadavg()[0]], "attention_kernels": dict(kernels), "attention_layers": log}


def param_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--variant", default="pasd", choices=["pasd", "pasd_light"])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--attention", default="auto", choices=list(attention.IMPLS))
    p.add_argument("--no-share-prefix", action="store_true",
                   help="repeat the latent and LQ image per prompt before the models (as the official pipeline "
                        "does) instead of running their text-independent prefix once per image")
    p.add_argument("--xla-options", default="auto", choices=["auto", "none"],
                   help="auto: pasd_jax.sampling.xla_options for this backend; none: XLA's defaults")
    p.add_argument("--weights", default="random", help="'random' or an official-layout PASD checkpoint folder")
    p.add_argument("--make-checkpoint", metavar="DIR", default=None,
                   help="write an official-layout PASD checkpoint (unet/ + controlnet/) with random weights and exit")
    p.add_argument("--make-base", metavar="DIR", default=None,
                   help="write an SD base folder with random VAE / text-encoder weights (for pasd-sample --base) "
                        "and exit")
    p.add_argument("--compare-official", action="store_true",
                   help="alternate fresh processes of this step and the official one (bench/step_compare.py)")
    p.add_argument("--rounds", type=int, default=3, help="with --compare-official: ours/official pairs per size")
    p.add_argument("--threads", type=int, default=None, help="with --compare-official: CPUs for both sides")
    p.add_argument("--official-python", default=None, help="with --compare-official: python with torch+diffusers")
    p.add_argument("--out", default=None)
    a, _ = p.parse_known_args()
    if a.make_checkpoint or a.make_base:
        if a.make_checkpoint:
            make_checkpoint(a.model, a.variant, a.make_checkpoint)
        if a.make_base:
            make_base(a.model, a.make_base)
        return
    if a.compare_official:
        from bench.step_compare import compare

        compare(a)
        return
    dtype = dtype_of(a.dtype)
    t_start = time.perf_counter()
    with attention.attention_impl(a.attention):
        unet, cn = build(a.model, a.variant, dtype)
        step = make_step(unet, cn, share_prefix=not a.no_share_prefix)
        ctx_dim = unet.config.cross_attention_dim
        from pasd_jax.convert.base import abstract_of

        abstract = (jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), abstract_of(unet)),
                    jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), abstract_of(cn)))
        options = xla_options.compiler_options() if a.xla_options == "auto" else {}
        progs = {s: compile_size(step, abstract, s, a.batch, ctx_dim, dtype, options) for s in a.sizes}
        rss_compiled = rss_bytes()
        stage("placing the weights")
        t0 = time.perf_counter()
        if a.weights == "random":
            params = (place_random(unet, 0, dtype, "unet"), place_random(cn, 0, dtype, "controlnet"))
        else:
            (unet_l, up), (cn_l, cp) = load_checkpoint_params(a.weights, dtype)
            if jax.tree_util.tree_structure(up) != jax.tree_util.tree_structure(abstract[0]):
                raise SystemExit(f"{a.weights}: its UNet does not match --model {a.model} --variant {a.variant}")
            params = (up, cp)
        load_s = time.perf_counter() - t0
        rss_loaded = rss_bytes()
        stage(f"weights placed in {load_s:.1f} s ({param_bytes(params) / 2**30:.2f} GiB)")
        results = [run_size(progs[s], params, s, a.batch, ctx_dim, dtype, a.repeats) for s in a.sizes]
    emit({"benchmark": "pasd_step", "model": a.model, "variant": a.variant, "dtype": a.dtype,
          "attention": a.attention, "share_prefix": not a.no_share_prefix, "weights": a.weights, "xla_options": options, "env": environment(),
          "cpu_count": len(os.sched_getaffinity(0)), "param_bytes": param_bytes(params), "load_s": load_s,
          "rss_after_compile_bytes": rss_compiled, "rss_after_load_bytes": rss_loaded,
          "peak_rss_bytes": peak_rss_bytes(), "total_s": time.perf_counter() - t_start, "results": results}, a.out)


if __name__ == "__main__":
    main()
