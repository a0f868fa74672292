"""The memory plan of a sampling run: its peak estimated from the model configs before anything is compiled.

Why: an image that does not fit used to be found out by the compiler or the allocator minutes into a run (a
2400x1600 input asked for 262 GB: the untiled 300x200 latent put 60 000-token attention through the plain kernel,
whose fp32 score matrices alone are 230 GB for the CFG pair). `plan()` estimates the peak for a size, dtype and
tiling; if it exceeds the budget it tries, in order, the memory-bounded attention kernel, the tiled VAE and latent
tiles of decreasing size, and returns the first options that fit, or a message naming the size, the estimate and
the flags that help.

The estimate (bytes) = weights (as held, plus the compute-dtype copies the pipeline places; on a CPU in bf16/fp16
also their fp32 copies) + buffers kept across the program (input, condition, latents, outputs) + the largest phase:
VAE encode, one ControlNet + UNet call, or VAE decode. Each phase is a count of live full-size activations calibrated against XLA's compiled temporaries
(`compiled.memory_analysis()`, CPU, jax 0.10.2; bench/RESULTS.md "CPU step and memory"), plus the attention
kernel's own temporaries from `models.attention.plan_attention` on every attention call of the configs. It is an
estimate: a plan leaves `HEADROOM` of the budget free.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import jax
import numpy as np

from pasd_jax.errors import ConfigError, PasdError
from pasd_jax.models import attention
from pasd_jax.models.bundle import COMPONENTS, Models
from pasd_jax.sampling.options import DTYPES, SamplingOptions
from pasd_jax.sampling.tiling import needs_tiling

ENV = "PASD_MEMORY_BUDGET"
HEADROOM = 0.9            # a plan fits when its estimate is at most this share of the budget
RUNTIME_BYTES = 400 << 20  # the JAX runtime, compiled programs and the host side of a run
# Live full-size activations per phase, in units of the phase's widest full-resolution activation (measured: SD1.5
# VAE at 256 and 512 px, fp32 CPU: encoder 3.0-3.1 x 128 channels, decoder 3.5 x 256 channels, untiled; the tiled
# VAE keeps whole activations plus padded copies: encoder up to 10.3 x, decoder 7.4 x; tiny VAE alike).
VAE_ENCODE_COPIES, VAE_DECODE_COPIES = 3.1, 3.5
VAE_ENCODE_TILED_COPIES, VAE_DECODE_TILED_COPIES = 10.3, 7.5
# One ControlNet + UNet call: the DR pyramid's first level at image resolution (input + about 2.5 maps of its
# channels: tiny model at 128-512 px, where it dominates) and, on the latent path, the UNet skips + ControlNet
# residuals held at once plus working maps of the widest level (c x tokens; GEGLU alone is 12 of them): fitted to
# the SD1.5 CFG step (fp32, flash, the sampler's XLA options; pyramid per image, latent path per prompt as
# models.shared_batch runs them): 189 MB compiled at 256 px (estimate 192), 761 MB at 512 (753).
COND_COPIES = 2.5
LATENT_WORK_MAPS = 60.0
LATENT_TILE_CANDIDATES = (256, 192, 160, 128, 96, 64)
# First compile of the sampler per billion UNet parameters: the SD1.5 ControlNet + PASD UNet step alone compiles
# in 16-18 s on the 2-vCPU VM (jax 0.10.2); the sampler adds the VAE passes and the scheduler loop around it.
COMPILE_S_PER_GPARAM = 25.0


class MemoryPlanError(PasdError, MemoryError):
    """No options fit the memory budget; the message names the size, the estimate and the flags that help."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per device of the parts of one sampling call (the phases run one after another)."""
    weights: int
    buffers: int
    denoise: int
    attention: int    # the worst attention call's temporaries (included in `denoise` / the VAE phases)
    vae_encode: int
    vae_decode: int
    runtime: int = RUNTIME_BYTES
    widened: int = 0  # CPU, bf16/fp16: fp32 copies of the weights (widened_bytes)

    @property
    def total(self) -> int:
        return self.weights + self.widened + self.buffers + self.runtime + max(self.denoise, self.vae_encode,
                                                                                self.vae_decode)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run an image with. `options` and `attention` (a `models.attention` implementation to force around
    the sampler, "auto" for none) are the given ones if they fit, else the first candidate that fits, else the
    candidate with the smallest estimate; `changes` lists what differs from the request (CLI flags where one
    exists)."""
    fits: bool
    estimate_bytes: int
    budget_bytes: int | None
    estimate: Estimate
    options: SamplingOptions
    attention: str
    changes: tuple[str, ...]
    height: int
    width: int
    batch: int
    message: str

    def check(self) -> "Plan":
        """The plan itself if it fits; otherwise `MemoryPlanError` with the message (before anything compiles)."""
        if not self.fits:
            raise MemoryPlanError(self.message)
        return self


# ------------------------------------------------------------------------------------------ budget

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str, what: str = ENV) -> int:
    """'24G', '24 GiB', '800MB', '1.5t' or a plain byte count -> bytes (G = GiB; GB = 10^9)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what}={text!r} is not a memory size: write e.g. 24G, 800MB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def _host_available() -> int | None:
    """Memory this process could use: MemAvailable plus what it already holds, capped by a cgroup limit."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        avail = int(info["MemAvailable"].split()[0]) * 1024
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, KeyError, ValueError):
        return None
    total = avail + rss
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < total:
            total = int(text)
    return total


def budget_from_env(backend: str | None = None) -> int | None:
    """$PASD_MEMORY_BUDGET ('off' disables planning), else device memory (GPU/TPU) or host memory (CPU)."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        if env.strip().lower() in ("off", "none", "0", "no"):
            return None
        return parse_bytes(env)
    backend = backend or jax.default_backend()
    if backend != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    return _host_available()


# ------------------------------------------------------------------------------------------ estimates

def _param_bytes(module: Any, itemsize: int) -> int:
    from pasd_jax.convert.base import abstract_of  # traces the module once (memoised)

    return sum(int(np.prod(x.shape)) * itemsize for x in jax.tree_util.tree_leaves(abstract_of(module)))


def weight_bytes(models: Models, dtype_name: str, params: dict | None = None) -> int:
    """Weights as held plus, for leaves in another float dtype, the compute-dtype copies the pipeline places."""
    itemsize = np.dtype(DTYPES[dtype_name]).itemsize
    if params is None:
        return sum(_param_bytes(getattr(models, c), itemsize) for c in COMPONENTS)
    total = 0
    for leaf in jax.tree_util.tree_leaves(params):
        n, dt = int(np.prod(np.shape(leaf))), np.dtype(leaf.dtype)
        total += n * dt.itemsize + (n * itemsize if np.issubdtype(dt, np.floating) and dt != DTYPES[dtype_name] else 0)
    return total


def widened_bytes(models: Models, dtype_name: str, backend: str) -> int:
    """fp32 copies of the UNet, ControlNet and VAE weights a bf16/fp16 program holds on a CPU: XLA's CPU backend
    widens each weight for its dots and convs and schedules every convert first, so all copies are live at once
    (a 4-layer bf16 program's temporaries are its weights in fp32; SD1.5 bf16 at 768 px: 11.9 GB resident)."""
    if backend != "cpu" or np.dtype(DTYPES[dtype_name]).itemsize >= 4:
        return 0
    return sum(_param_bytes(getattr(models, c), 4) for c in ("unet", "controlnet", "vae"))


def _levels(cfg: Any, h: int, w: int) -> list[tuple[int, int]]:
    """(channels, tokens) per UNet level for a latent of h x w (each level halves with ceil, as the convs do)."""
    out = []
    for c in cfg.block_out_channels:
        out.append((c, h * w))
        h, w = -(-h // 2), -(-w // 2)
    return out


def _skip_elements(cfg: Any, h: int, w: int) -> int:
    levels = _levels(cfg, h, w)
    total = levels[0][0] * levels[0][1]  # conv_in
    for i, (c, t) in enumerate(levels):
        total += cfg.layers_per_block[i] * c * t
        if i < len(levels) - 1:
            total += c * levels[i + 1][1]
    return total


def _attention_calls(models: Models, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(heads, q_len, kv_len, head_dim) of the attention shapes of one ControlNet + UNet call: per level with text
    attention self and text cross-attention (down and up paths, ControlNet alike), PACA / attn2_plus against the
    residual of the same level (its tokens), and the mid block."""
    cfg = models.unet.config
    levels = _levels(cfg, h, w)
    calls = []
    for i, kind in enumerate(cfg.down_block_types):
        (c, t), heads = levels[i], cfg.heads[i]
        text = kind == "CrossAttnDownBlock2D"
        if text:
            calls += [(heads, t, t, c // heads), (heads, t, 77, c // heads)]
        if models.unet.variant == "pasd" or (models.unet.variant == "pasd_light" and text):
            calls.append((heads, t, t, c // heads))
    (c, t), heads = levels[-1], cfg.heads[-1]
    return calls + [(heads, t, t, c // heads), (heads, t, 77, c // heads)]


def _attention_peak(calls: Sequence[tuple[int, int, int, int]], batch: int, dtype: Any, backend: str,
                    impl: str) -> int:
    with attention.attention_impl(impl):
        return max((attention.plan_attention(batch, n, q, k, d, dtype, backend).working_bytes
                    for n, q, k, d in calls), default=0)


def denoise_bytes(models: Models, n: int, h: int, w: int, dtype_name: str, backend: str, impl: str = "auto",
                  images: int | None = None) -> tuple[int, int]:
    """(activation, attention) bytes of one ControlNet + UNet call on `n` rows of h x w latents, `images` of them
    distinct (default n): the DR pyramid runs once per image (`models.shared_batch`)."""
    dtype = DTYPES[dtype_name]
    itemsize, cfg, ccfg = np.dtype(dtype).itemsize, models.unet.config, models.controlnet.config
    f = 2 ** (len(models.vae.config.block_out_channels) - 1)
    pixels = (f * h) * (f * w)
    cond = pixels * (ccfg.conditioning_channels + COND_COPIES * ccfg.conditioning_embedding_out_channels[0])
    levels = _levels(cfg, h, w)
    widest = max(c * t for c, t in levels)
    latent = 2 * _skip_elements(cfg, h, w) + cfg.block_out_channels[-1] * levels[-1][1] + LATENT_WORK_MAPS * widest
    attn = _attention_peak(_attention_calls(models, h, w), n, dtype, backend, impl)
    # the pyramid runs before the latent path; attention temporaries come on top of the latent path's live set
    return int(max((images or n) * cond * itemsize, n * latent * itemsize + attn)), attn


def vae_bytes(models: Models, batch: int, height: int, width: int, dtype_name: str, tiled: tuple[bool, bool],
              backend: str, impl: str = "auto") -> tuple[int, int, int]:
    """(encode, decode, mid-block attention) bytes of the VAE on `batch` images of height x width pixels."""
    cfg = models.vae.config
    itemsize = np.dtype(DTYPES[dtype_name]).itemsize
    pixels = height * width
    ch = cfg.block_out_channels
    enc_c = VAE_ENCODE_TILED_COPIES if tiled[0] else VAE_ENCODE_COPIES
    dec_c = VAE_DECODE_TILED_COPIES if tiled[1] else VAE_DECODE_COPIES
    f = 2 ** (len(ch) - 1)
    tokens = (height // f) * (width // f)
    attn = _attention_peak([(1, tokens, tokens, ch[-1])], batch, DTYPES[dtype_name], backend, impl)
    enc = int(batch * pixels * ch[0] * enc_c * itemsize) + attn
    dec = int(batch * pixels * ch[min(1, len(ch) - 1)] * dec_c * itemsize) + attn
    return enc, dec, attn


def estimate(models: Models, options: SamplingOptions, height: int, width: int, *, batch: int = 1,
             devices: int = 1, backend: str | None = None, params: dict | None = None, impl: str = "auto",
             weights: int | None = None) -> Estimate:
    """The peak of one `PASDPipeline.sample` call on `batch` images of height x width pixels, per device."""
    backend = backend or jax.default_backend()
    f = 2 ** (len(models.vae.config.block_out_channels) - 1)
    h, w = height // f, width // f
    cfg_mult = 2 if options.use_cfg else 1
    tiled = needs_tiling(h, w, options.latent_tile_size)
    if tiled:  # tile chunks over the devices, whole images replicated
        tile = min(options.latent_tile_size, h, w)
        chunk = -(-options.tile_batch // devices) * devices
        rows = chunk // devices
        den, attn = denoise_bytes(models, cfg_mult * rows, tile, tile, options.dtype, backend, impl, images=rows)
        per_dev = batch
    else:
        per_dev = -(-batch // devices)
        den, attn = denoise_bytes(models, cfg_mult * per_dev, h, w, options.dtype, backend, impl, images=per_dev)
    vae_tiles = (options.tiled_vae == "on" or (options.tiled_vae == "auto" and max(height, width) >
                                                  options.vae_encoder_tile + 64),
                 options.tiled_vae == "on" or (options.tiled_vae == "auto" and max(h, w) >
                                                  options.vae_decoder_tile + 22))
    enc, dec, vattn = vae_bytes(models, per_dev, height, width, options.dtype, vae_tiles, backend, impl)
    latent = 4 * h * w * 4
    buffers = per_dev * (height * width * 3 * 2              # uint8 input and output
                         + 2 * 3 * height * width * 4        # the condition in [0, 1] and the decoder's float output
                         + (options.steps + 4) * latent)     # per-step latents, z0, noise draws
    if weights is None:
        weights = weight_bytes(models, options.dtype, params)
    return Estimate(weights=weights, buffers=int(buffers), denoise=den, attention=max(attn, vattn),
                    vae_encode=enc, vae_decode=dec, widened=widened_bytes(models, options.dtype, backend))


# ------------------------------------------------------------------------------------------ the plan

def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _flag(field: str, value: Any) -> str:
    return {"latent_tile_size": f"--latent-tile-size {value}", "tiled_vae": f"--tiled-vae {value}",
            "dtype": f"--dtype {value}"}.get(
        field, f"{field}={value}")


def plan(models: Models, options: SamplingOptions, height: int, width: int, budget_bytes: int | None = None, *,
         batch: int = 1, devices: int = 1, backend: str | None = None, params: dict | None = None,
         weights: int | None = None) -> Plan:
    """The options to sample `batch` images of height x width pixels with, within `budget_bytes` (default
    `budget_from_env()`; None there means unlimited: the request comes back with its estimate).

    Tried in order, each kept only if it lowers the estimate: the memory-bounded attention kernel (`flash` on hosts,
    `chunked` on accelerators), the tiled VAE (same numbers), latent tiles of decreasing size (the official tiling:
    results change a little at tile seams)."""
    backend = backend or jax.default_backend()
    if budget_bytes is None:
        budget_bytes = budget_from_env(backend)
    f = 2 ** (len(models.vae.config.block_out_channels) - 1)
    h, w = height // f, width // f
    if weights is None:
        weights = weight_bytes(models, options.dtype, params)

    def est(opts: SamplingOptions, impl: str) -> Estimate:
        return estimate(models, opts, height, width, batch=batch, devices=devices, backend=backend, impl=impl,
                        weights=weights)

    def fits(e: Estimate) -> bool:
        return budget_bytes is None or e.total <= HEADROOM * budget_bytes

    def done(ok: bool, opts: SamplingOptions, e: Estimate, impl: str, changes: list[str]) -> Plan:
        return _plan(ok, opts, e, impl, changes, budget_bytes, height, width, batch, requested)

    requested = best = est(options, "auto")
    opts, impl, changes = options, "auto", []
    if fits(best):
        return done(True, opts, best, impl, changes)
    safe = "flash" if backend == "cpu" else "chunked"
    e = est(options, safe)
    if e.total < best.total:
        impl, best = safe, e
        changes.append(f"attention={safe}")
        if fits(best):
            return done(True, opts, best, impl, changes)
    for mode in (m for m in ("on", "off") if m != options.tiled_vae):  # the tiled VAE keeps padded copies too
        cand = dataclasses.replace(opts, tiled_vae=mode)
        e = est(cand, impl)
        if e.total < best.total:
            opts, best = cand, e
            changes = [c for c in changes if not c.startswith("--tiled-vae")] + [_flag("tiled_vae", mode)]
            if fits(best):
                return done(True, opts, best, impl, changes)
    smallest = (opts, best, list(changes))
    for tile in LATENT_TILE_CANDIDATES:
        if tile >= options.latent_tile_size or not needs_tiling(h, w, tile):
            continue
        cand = dataclasses.replace(opts, latent_tile_size=tile, tile_batch=1)
        e = est(cand, impl)
        extra = [_flag("latent_tile_size", tile)] + (["tile_batch=1"] if options.tile_batch != 1 else [])
        if fits(e):
            return done(True, cand, e, impl, changes + extra)
        if e.total < smallest[1].total:
            smallest = (cand, e, changes + extra)
    if options.dtype == "float32" and backend != "cpu":  # named, not applied: bf16 changes the numbers (on a CPU
        cand = dataclasses.replace(smallest[0], dtype="bfloat16")  # it adds fp32 copies: widened_bytes)
        e = est(cand, impl)
        e = dataclasses.replace(e, weights=weight_bytes(models, "bfloat16", params) if params is not None
                                else weights * 2 // np.dtype(DTYPES[options.dtype]).itemsize)
        if e.total < smallest[1].total:
            return done(False, cand, e, impl, smallest[2] + [_flag("dtype", "bfloat16")])
    return done(False, smallest[0], smallest[1], impl, smallest[2])


def _plan(fits: bool, opts: SamplingOptions, est: Estimate, impl: str, changes: list[str], budget: int | None,
          height: int, width: int, batch: int, requested: Estimate) -> Plan:
    size = f"{width}x{height}" + (f" (batch {batch})" if batch > 1 else "")
    parts = (f"weights {_gb(est.weights)}, denoising {_gb(est.denoise)}, VAE encode {_gb(est.vae_encode)}, "
             f"decode {_gb(est.vae_decode)}"
             + (f", fp32 copies of the weights for the CPU {_gb(est.widened)} (--dtype float32 avoids them)"
                if est.widened else ""))
    budget_text = f"the {_gb(budget)} budget (${ENV} or free memory)" if budget else "no budget"
    if fits and not changes:
        msg = f"{size}: about {_gb(est.total)} ({parts}), within {budget_text}"
    elif fits:
        msg = (f"{size}: about {_gb(requested.total)} as asked, more than {budget_text}; with "
               f"{' '.join(changes)} about {_gb(est.total)} ({parts})")
    else:
        helps = f"; the smallest found: {' '.join(changes)} about {_gb(est.total)}" if changes else ""
        vae = max(est.vae_encode, est.vae_decode) >= est.denoise
        fix = ("the VAE at full resolution dominates: use a smaller --process-size or --upscale" if vae else
               "use a smaller --latent-tile-size, --process-size or --upscale")
        msg = (f"a {size} image needs about {_gb(requested.total)} with these settings, more than {budget_text}"
               f"{helps} ({parts}); {fix}, or raise ${ENV}")
    return Plan(fits=fits, estimate_bytes=est.total, budget_bytes=budget, estimate=est, options=opts,
                attention=impl, changes=tuple(changes), height=height, width=width, batch=batch, message=msg)


def expected_compile_seconds(models: Models, tiled: bool) -> float:
    """A rough first-compile time of the sampler (for the line a runner prints before the first call), scaled by
    the UNet's parameter count from the CPU figure above; later runs read JAX's compilation cache if one is set."""
    scaled = COMPILE_S_PER_GPARAM * _param_bytes(models.unet, 1) / 1e9 * (1.3 if tiled else 1.0)
    return max(15.0, scaled)  # a fixed cost too: the tiny models' first call took 18-44 s (bench/RESULTS.md)

