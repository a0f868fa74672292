"""End-to-end PASD sampling: read LR PNGs, x4 official preprocessing, VAE encode + ANS, N steps with CFG
(ControlNet + PASD UNet), decode, wavelet colour fix, write PNGs. Random weights at SD1.5 (or tiny) sizes.

Each case is `<output size>x<batch>` with optional `:t<latent tile>` (latent tiling with that tile size, in latent
pixels), `:o<overlap>` (default 8) and `:vae=<auto|on|off>`. Reports seconds per image (median over repeats; the
first call, compile + run, apart), the sampler alone (`pipe.sample`) and the host work around it, and peak device
memory. `--isolate` runs every case in a fresh process so each peak is that case's own (JAX's peak counter never
resets).

    python bench/bench_sample.py --model sd15 --dtype bfloat16 --cases 512x1 512x8 768x1 --isolate --out s1.json
    python bench/bench_sample.py --model sd15 --dtype bfloat16 --cases 768x4 2048x1 2048x1:t160 --isolate --out s2.json
    python bench/bench_sample.py --model tiny --dtype float32 --cases 64x1 64x2 96x1:t8:o3 --steps 4 --repeats 2

Folder mode (`--folder N`): pasd-sample's runner over N images of the first case's size, images/s with the host
work (decode, preprocessing, colour fix, PNG encode) overlapped with the device by the runner's thread pool and
without (`--no-overlap`: only without), after a warm-up run that compiles. First-image mode (`--first-image`): the
pasd-sample CLI on one image in a fresh process, with an empty persistent compilation cache (cold) and again with
it filled (warm), on a real checkpoint (default: the tiny golden ones beside the checkout).

    python bench/bench_sample.py --model tiny --dtype float32 --cases 64x2 --steps 4 --folder 32 --repeats 3
    python bench/bench_sample.py --first-image --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import (ASSETS, dtype_of, emit, environment, load_config, peak_memory_bytes,  # noqa: E402
                          random_params, time_fn)
from pasd_jax import image_ops  # noqa: E402
from pasd_jax.convert import build_module  # noqa: E402
from pasd_jax.models import attention  # noqa: E402
from pasd_jax.models.config import controlnet_config_from_unet  # noqa: E402
from pasd_jax.models.bundle import Models  # noqa: E402
from pasd_jax.sampling.options import SamplingOptions  # noqa: E402
from pasd_jax.sampling.pipeline import PASDPipeline  # noqa: E402

UPSCALE = 4
PROMPT = "a photo of a dog, clean, high-resolution, 8k"
NEGATIVE = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"


def parse_case(text: str) -> dict:
    head, *mods = text.split(":")
    size, batch = (int(v) for v in head.split("x"))
    case = {"name": text, "size": size, "batch": batch, "latent_tile": None, "overlap": 8, "vae": "auto"}
    for m in mods:
        if m.startswith("t"):
            case["latent_tile"] = int(m[1:])
        elif m.startswith("o"):
            case["overlap"] = int(m[1:])
        elif m.startswith("vae="):
            case["vae"] = m[4:]
        else:
            raise SystemExit(f"bad case modifier {m!r} in {text!r}")
    if size % (8 * UPSCALE):
        raise SystemExit(f"output size {size} must be a multiple of {8 * UPSCALE} (x{UPSCALE} of a multiple of 8)")
    return case


def build_pipeline(model: str, dtype) -> PASDPipeline:
    ucfg = load_config(model, "unet")
    mods = {"unet": build_module("unet", ucfg, variant="pasd"),
            "controlnet": build_module("controlnet", controlnet_config_from_unet(ucfg)),
            "vae": build_module("vae", load_config(model, "vae")),
            "text_encoder": build_module("text_encoder", load_config(model, "text_encoder"))}
    params = {k: random_params(m, 0, dtype, stream=k) for k, m in mods.items()}
    models = Models(mods["unet"], mods["controlnet"], mods["vae"], mods["text_encoder"])
    return PASDPipeline(models, params, ASSETS / "sd15" / "scheduler", ASSETS / "sd15" / "tokenizer")


def write_inputs(folder: pathlib.Path, size: int, batch: int) -> list[pathlib.Path]:
    """Smooth random LR images (size / 4 square) as PNGs."""
    rng = np.random.default_rng(size * 1000 + batch)
    lr = size // UPSCALE
    paths = []
    for i in range(batch):
        coarse = rng.integers(0, 256, (lr // 8 + 1, lr // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((lr, lr), Image.BICUBIC)
        paths.append(folder / f"in_{i}.png")
        img.save(paths[-1])
    return paths


def run_case(pipe: PASDPipeline, case: dict, args, workdir: pathlib.Path) -> dict:
    size, batch = case["size"], case["batch"]
    opts = SamplingOptions(steps=args.steps, scheduler=args.scheduler, dtype=args.dtype_name,
                           latent_tile_size=case["latent_tile"] or 320, latent_tile_overlap=case["overlap"],
                           tiled_vae=case["vae"],
                           tile_batch=args.tile_batch)
    paths = write_inputs(workdir, size, batch)
    out_dir = workdir / "out"
    out_dir.mkdir(exist_ok=True)
    keys = jax.random.split(jax.random.key(1), batch)
    state = {}

    def end_to_end():
        lrs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        x = np.stack([image_ops.preprocess_official(im, upscale=UPSCALE, process_size=size) for im in lrs])
        t = time.perf_counter()
        out = pipe.sample(x, [PROMPT] * batch, [NEGATIVE], keys, opts)
        state["sample_s"] = time.perf_counter() - t
        fixed = np.asarray(image_ops.wavelet_color_fix(out, x))
        for i, lr in enumerate(lrs):  # final resize to (w * 4, h * 4): the processed size here, so a no-op
            target = (lr.shape[1] * UPSCALE, lr.shape[0] * UPSCALE)
            img = Image.fromarray(fixed[i])
            if img.size != target:
                img = img.resize(target, Image.BICUBIC)
            img.save(out_dir / f"out_{i}.png")

    traces_before = pipe.trace_count
    sample_times = []

    def timed():
        end_to_end()
        sample_times.append(state["sample_s"])
    timing = time_fn(timed, repeats=args.repeats)
    per_image = timing["median_s"] / batch
    sample_med = float(np.median(sample_times[1:])) if len(sample_times) > 1 else sample_times[0]
    h = size // 8
    return {"case": case["name"], "output": f"{size}x{size}", "input": f"{size // UPSCALE}x{size // UPSCALE}",
            "batch": batch, "latent": f"{h}x{h}", "latent_tiled": h * h > opts.latent_tile_size ** 2,
            "latent_tile_size": opts.latent_tile_size, "tiled_vae": case["vae"],
            "compile_and_first_call_s": timing["first_call_s"], "end_to_end_batch_s": timing["median_s"],
            "end_to_end_s_per_image": per_image, "images_per_s": 1.0 / per_image,
            "sampler_batch_s": sample_med, "sampler_s_per_image": sample_med / batch,
            "host_io_s_per_image": (timing["median_s"] - sample_med) / batch,
            "repeats": timing["repeats"], "traces": pipe.trace_count - traces_before,
            "peak_memory_bytes": peak_memory_bytes(),
            "peak_memory_gib": None if peak_memory_bytes() is None else peak_memory_bytes() / 2 ** 30}


def run_folder(pipe: PASDPipeline, case: dict, args, workdir: pathlib.Path) -> dict:
    """Images/s of runner.run over a folder, with and without host/device overlap (alternating rounds)."""
    from pasd_jax.sampling.runner import RunSettings, run

    size, batch = case["size"], case["batch"]
    opts = SamplingOptions(steps=args.steps, scheduler=args.scheduler, dtype=args.dtype_name,
                           latent_tile_size=case["latent_tile"] or 320, latent_tile_overlap=case["overlap"],
                           tiled_vae=case["vae"], tile_batch=args.tile_batch)
    src = workdir / "in"
    src.mkdir()
    for i, path in enumerate(write_inputs(workdir, size, args.folder)):
        path.rename(src / f"img{i:04d}.png")
    modes = {"no_overlap": 0} if args.no_overlap else {"overlap": args.io_threads, "no_overlap": 0}
    warm = workdir / "warm"
    warm.mkdir()
    for path in sorted(src.iterdir())[:batch]:
        (warm / path.name).write_bytes(path.read_bytes())
    prompt = lambda image, rel: PROMPT  # noqa: E731
    times: dict[str, list[float]] = {m: [] for m in modes}
    for threads in set(modes.values()):  # compile (and warm every thread's colour-fix programs)
        run(pipe, opts, warm, workdir / f"warm_out{threads}", RunSettings(
            upscale=UPSCALE, process_size=size, batch_size=batch, negative_prompt=NEGATIVE, io_threads=threads),
            prompt, progress=False)
    for r in range(args.repeats):
        for mode, threads in modes.items():
            settings = RunSettings(upscale=UPSCALE, process_size=size, batch_size=batch, negative_prompt=NEGATIVE,
                                   io_threads=threads)
            t = time.perf_counter()
            summary = run(pipe, opts, src, workdir / f"out_{mode}_{r}", settings, prompt, progress=False)
            times[mode].append(time.perf_counter() - t)
            assert len(summary.written) == args.folder, summary.report()
    out = {"case": case["name"], "images": args.folder, "output": f"{size}x{size}", "batch": batch,
           "io_threads": args.io_threads, "repeats": args.repeats}
    for mode, ts in times.items():
        out[f"{mode}_s"] = ts
        out[f"{mode}_images_per_s"] = args.folder / float(np.median(ts))
    if len(modes) == 2:
        out["speedup"] = out["overlap_images_per_s"] / out["no_overlap_images_per_s"]
    return out


def first_image(args) -> dict:
    """Seconds from process start to the first written image, cold and warm persistent compilation cache."""
    golden = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"
    ckpt, base = args.ckpt or str(golden / "tiny_pasd"), args.base or str(golden / "tiny_pipeline")
    out = {"ckpt": ckpt, "base": base, "steps": args.steps, "dtype": args.dtype_name, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        write_inputs(tmp, 64, 1)[0].rename(tmp / "one.png")  # a 16x16 LR image
        cache = tmp / "xla"
        for name, flags in (("no cache", ["--no-compile-cache"]), ("cold", ["--compile-cache", str(cache)]),
                            ("warm", ["--compile-cache", str(cache)])):
            argv = [sys.executable, "-m", "pasd_jax.sampling.cli", "--ckpt", ckpt, "--base", base, "--input",
                    str(tmp / "one.png"), "--output", str(tmp / name.replace(" ", "_")), "--steps", str(args.steps),
                    "--dtype", args.dtype_name, "--process-size", "64", "--no-progress", "--no-cache", *flags]
            t = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            summary = json.loads((tmp / name.replace(" ", "_") / "summary.json").read_text())
            entries = sum(1 for _ in cache.rglob("*")) if cache.is_dir() else 0
            out["runs"].append({"run": name, "process_wall_s": wall,
                                "first_image_after_sampling_start_s": summary["seconds_to_first_image"],
                                "cache_entries": entries})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cases", nargs="+", default=["512x1", "512x8", "768x1"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "unipc", "lcm"])
    p.add_argument("--tile-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attention", default="auto", choices=list(attention.IMPLS))
    p.add_argument("--isolate", action="store_true", help="one fresh process per case (per-case peak memory)")
    p.add_argument("--folder", type=int, default=0, help="folder mode: this many images of the first case")
    p.add_argument("--no-overlap", action="store_true", help="folder mode: only without host/device overlap")
    p.add_argument("--io-threads", type=int, default=4, help="folder mode: the runner's host threads")
    p.add_argument("--first-image", action="store_true", help="cold vs warm compilation cache, CLI, one image")
    p.add_argument("--ckpt", default=None, help="first-image mode: PASD checkpoint (default: golden tiny_pasd)")
    p.add_argument("--base", default=None, help="first-image mode: SD base (default: golden tiny_pipeline)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.dtype_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(a.dtype, a.dtype)
    dtype_of(a.dtype_name)
    cases = [parse_case(c) for c in a.cases]
    head = {"benchmark": "pasd_sample_end_to_end", "model": a.model, "dtype": a.dtype_name, "steps": a.steps,
            "scheduler": a.scheduler, "guidance": "CFG 9.0 (batch 2B)", "upscale": UPSCALE,
            "attention": a.attention, "tile_batch": a.tile_batch, "env": environment()}
    if a.first_image:
        emit({"benchmark": "pasd_sample_first_image", "env": environment(), **first_image(a)}, a.out)
        return
    if a.folder:
        with attention.attention_impl(a.attention), tempfile.TemporaryDirectory() as tmp:
            pipe = build_pipeline(a.model, dtype_of(a.dtype_name))
            result = run_folder(pipe, cases[0], a, pathlib.Path(tmp))
        emit({**head, "benchmark": "pasd_sample_folder", "results": [result]}, a.out)
        return
    if a.isolate and len(cases) > 1:
        results = []
        for c in a.cases:
            argv = [sys.executable, __file__, "--model", a.model, "--dtype", a.dtype_name, "--cases", c,
                    "--steps", str(a.steps), "--scheduler", a.scheduler, "--tile-batch", str(a.tile_batch),
                    "--repeats", str(a.repeats), "--attention", a.attention]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode:
                results.append({"case": c, "error": proc.stderr[-2000:]})
                continue
            results.extend(json.loads(proc.stdout[proc.stdout.index("{"):])["results"])
        emit({**head, "isolated": True, "results": results}, a.out)
        return
    with attention.attention_impl(a.attention):
        t = time.perf_counter()
        pipe = build_pipeline(a.model, dtype_of(a.dtype_name))
        setup_s = time.perf_counter() - t
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for c in cases:
                folder = pathlib.Path(tmp) / c["name"].replace(":", "_")
                folder.mkdir()
                results.append(run_case(pipe, c, a, folder))
    emit({**head, "isolated": False, "model_setup_s": setup_s, "results": results}, a.out)


if __name__ == "__main__":
    main()
