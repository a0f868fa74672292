"""The official PyTorch PASD as the same-run baseline: one ControlNet+UNet step with CFG, and the 20-step loop.

Needs a git-ignored folder (default `third_party/official_bench`) holding the official `pasd/models` package, the
SD1.5 configs (`sd15_configs/`) and wheels of diffusers 0.29.2 / huggingface_hub 0.25.2 (installed by the caller into
a separate site dir); `bench/prepare_official.sh` documents how it is assembled. The models get random weights.

    python bench/official_baseline.py --sizes 512 768 --dtype float16 --out official.json
    .torchenv/bin/python bench/official_baseline.py --sizes 256 512 --dtype float32 --loop-steps 0 --threads 2  # CPU

On the CPU it reports the process's peak resident memory (weights + activations) beside the step times; this is the
baseline `bench/bench_step.py --compare-official` alternates with (torch threads = the CPUs it may use).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _import_official(root: pathlib.Path):
    sys.path.insert(0, str(root))
    import diffusers.utils.import_utils as iu

    iu._transformers_available = False  # only the models are needed: keep transformers out
    from pasd.models.pasd.controlnet import ControlNetModel
    from pasd.models.pasd.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel, ControlNetModel


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timed(fn, sync, repeats: int, warmup: int = 2) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"first_calls_s": first, "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
            "times_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO / "third_party" / "official_bench"))
    p.add_argument("--config", default="sd15", help="sd15, or a folder holding unet/config.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--loop-steps", type=int, default=20, help="0 skips the sampling-loop timing")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the usable CPUs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(mode='max-autotune-no-cudagraphs')")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    t_start = time.perf_counter()
    import torch
    from diffusers import UniPCMultistepScheduler

    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))

    root = pathlib.Path(a.root)
    UNet, ControlNet = _import_official(root)
    cfg_dir = root / "sd15_configs" if a.config == "sd15" else pathlib.Path(a.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    unet_cfg = json.loads((cfg_dir / "unet" / "config.json").read_text())
    unet = UNet.from_config(unet_cfg)
    controlnet = ControlNet.from_unet(unet)
    unet, controlnet = (m.to(device=device, dtype=dtype).eval() for m in (unet, controlnet))
    load_s = time.perf_counter() - t_start
    rss_loaded = _rss_bytes()
    ctx_dim = unet_cfg.get("cross_attention_dim", 768)
    sched = UniPCMultistepScheduler.from_pretrained(str(cfg_dir / "scheduler")) if a.loop_steps else None

    def step_fn(latents, t, ctx, cond):
        x = torch.cat([latents] * 2)
        _, down, mid = controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, conditioning_scale=1.0,
                                  return_dict=False)
        eps = unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, return_dict=False)[0]
        u, c = eps.chunk(2)
        return u + 9.0 * (c - u)

    results = []
    with torch.inference_mode():
        for size in a.sizes:
            lat = size // 8
            latents = torch.randn(1, 4, lat, lat, device=device, dtype=dtype)
            ctx = torch.randn(2, 77, ctx_dim, device=device, dtype=dtype)
            cond = torch.rand(2, 3, size, size, device=device, dtype=dtype)
            t = torch.tensor(500, device=device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            load0 = os.getloadavg()[0]
            step = _timed(lambda: step_fn(latents, t, ctx, cond), sync, a.repeats, warmup=a.warmup)

            def loop():
                sched.set_timesteps(a.loop_steps)
                z = latents
                for ts in sched.timesteps:
                    z = sched.step(step_fn(z, ts, ctx, cond), ts, z, return_dict=False)[0]
                return z

            entry = {"size": size, "step_ms": 1000 * step["median_s"], "step": step,
                     "load_avg": [load0, os.getloadavg()[0]], "peak_rss_bytes": _peak_rss_bytes(),
                     "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
            if a.loop_steps:
                loop_t = _timed(loop, sync, max(1, a.repeats // 5), warmup=1)
                entry.update({f"loop_{a.loop_steps}_s": loop_t["median_s"], "loop": loop_t})
            if a.compile:
                compiled = torch.compile(step_fn, mode="max-autotune-no-cudagraphs")
                entry["compiled_step"] = _timed(lambda: compiled(latents, t, ctx, cond), sync, a.repeats)
                entry["compiled_step_ms"] = 1000 * entry["compiled_step"]["median_s"]
            results.append(entry)
    out = {"benchmark": "official_pasd_step", "dtype": a.dtype, "device": device,
           "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu_count": len(os.sched_getaffinity(0)), "date": datetime.date.today().isoformat(), "load_s": load_s,
           "rss_after_load_bytes": rss_loaded, "peak_rss_bytes": _peak_rss_bytes(), "results": results}
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        pathlib.Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")
    main()
