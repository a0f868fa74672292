"""The PASD sampler: official pipeline semantics (spec 4.4-4.10) as compiled, cached, sharded JAX programs.

    pipe = PASDPipeline(models, "<sd15>/scheduler", "<sd15>/tokenizer")
    out = pipe.sample(images_u8, prompts, negative_prompts, keys, SamplingOptions(steps=20))

`sample` returns the pipeline's images before the colour fix, round(clamp(x / 2 + 0.5) * 255) as uint8, like the
official pipeline's `.images`; colour fix, resizing and file I/O belong to the caller (`sample.py`).

Programs and compilation
- Untiled images (latent h * w <= T^2): ONE jitted program per (batch, processed size, steps, scheduler, dtype,
  shape-changing options): VAE encode, posterior sample, ANS, the denoising loop as `lax.scan` (ControlNet + PASD
  UNet + CFG + scheduler step), VAE decode and the uint8 conversion. Guidance, conditioning scale, ANS level/mode
  and offset-noise scale are runtime arrays, so changing them reuses the program.
- Large images (h * w > T^2): the official latent tiling (spec 4.7). The expensive part, ControlNet + UNet on a
  batch of `tile_batch` tiles of the fixed tile size T' = min(T, h, w) (with their CFG pairs), is one program shared
  by every image size. The size-dependent parts are three cheap programs without any network in the loop:
  `tiled_prepare` (VAE encode, ANS, cut latent/condition tiles), `tiled_step` (Gaussian blend of the tile outputs,
  scheduler step, re-cut; the step index is traced, so one program serves all steps) and `tiled_finish` (decode).
  The step loop is a Python loop: each step runs ceil(tiles / tile_batch) model calls of a few hundred ms, so
  dispatch costs nothing measurable, while keeping the loop in one `lax.scan` would tie the UNet's compilation
  to the image size. All tiles of all images in the batch go through the model in fixed-size chunks (the last
  chunk is topped up with copies of the last tile, whose outputs are dropped). `tile_batch` defaults to 2: one
  320x320-latent tile with its CFG pair is already 2 x 25 times the work of a 512 image, which saturates a GPU, so
  bigger chunks gain little and waste up to tile_batch - 1 tiles per image in the last chunk. Guidance is applied
  per tile before blending (both are linear, so this equals the official order up to rounding). Only an image
  narrower than T latent pixels gets a different tile side T' and hence a second model program.
- The VAE (tiled above the official thresholds; exact, see `vae_tiling`) is part of the untiled program and of
  the cheap per-size programs of the tiled path.
- Every program lives in an explicit cache keyed by everything that changes its shapes or structure;
  `trace_counts` counts traces per program kind (`trace_count` is their sum), which the tests check.

Randomness: each image's draws come from its own key, `jax.random.split(key, 4)` -> (posterior noise, noise at
timesteps[0], added noise at the ANS level, DDIM variance noise), or (noise, offset noise) for the pure-noise start.
`draws=` injects tensors instead (the recorded golden draws). Results thus do not depend on batch composition.

Precision: `dtype` casts all frozen params and the model compute; latents, the scheduler, the guidance arithmetic,
norm statistics, softmax and the final convs stay fp32 (the official keeps fp16 latents; fp32 is strictly better).

Devices: a 1-D mesh over all devices (or `devices=`), params replicated. Untiled, the batch is padded to a multiple
of the device count (copies of the last image, dropped) and split by image. Tiled, the unit of parallelism is the
tile: every model call's chunk (`tile_batch` rounded up to the device count) is split over the devices, while the
cheap whole-image work (VAE, blend, scheduler step) is replicated unless the batch divides evenly, so one large
image uses every device without being duplicated.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.sampling import denoise as core
from pasd_jax.sampling import sharding, tiling, vae_tiling
from pasd_jax.sampling.text import TextEncoderCache, load_tokenizer, tokenize
from pasd_jax.schedulers import ANS_MODES, SCHEDULER_KINDS, ans_coefficients, scheduler_from_config
from pasd_jax.schedulers.schedule import load_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TILED_VAE_MODES = ("auto", "on", "off")
DRAW_NAMES_ANS = ("posterior", "noise", "added_noise")
DRAW_NAMES_INIT_NOISE = ("noise", "offset_noise")


class Models(NamedTuple):
    """Flax modules and their params (any float dtype; cast per `SamplingOptions.dtype`)."""
    unet: Any
    unet_params: Any
    controlnet: Any
    controlnet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_encoder_params: Any


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings (official `test_pasd.py` defaults, spec 4.1). Validated on construction.

    tiled_vae: "auto" (official thresholds: encoder above tile + 64 px, decoder above tile + 22 latent px), "on",
    "off". vae_encoder_tile is in image pixels, vae_decoder_tile in latent pixels. tile_batch: latent tiles per
    ControlNet + UNet call in the tiled path (rounded up to a multiple of the device count); it fixes that
    program's shape, so every large image size reuses it.
    """
    steps: int = 20
    scheduler: str = "unipc"
    guidance_scale: float = 9.0
    conditioning_scale: float = 1.0
    added_noise_level: int = 900
    ans_mode: str = "paper"
    init_noise: bool = False
    offset_noise_scale: float = 0.0
    eta: float = 0.0
    latent_tile_size: int = 320
    latent_tile_overlap: int = 8
    tiled_vae: str = "auto"
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224
    dtype: str = "float32"
    tile_batch: int = 2

    def __post_init__(self):
        def fail(msg: str):
            raise ValueError(f"SamplingOptions: {msg}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        if self.tiled_vae is True or self.tiled_vae is False:
            object.__setattr__(self, "tiled_vae", "on" if self.tiled_vae else "off")
        if not is_int(self.steps) or self.steps < 1:
            fail(f"steps must be a positive integer, got {self.steps!r}")
        if self.scheduler not in SCHEDULER_KINDS:
            fail(f"scheduler must be one of {SCHEDULER_KINDS}, got {self.scheduler!r}")
        for name in ("guidance_scale", "conditioning_scale", "offset_noise_scale", "eta"):
            if not is_num(getattr(self, name)):
                fail(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.eta < 0:
            fail(f"eta must be >= 0, got {self.eta}")
        if self.eta > 0 and self.scheduler != "ddim":
            fail(f"eta only applies to the ddim scheduler (got eta={self.eta} with {self.scheduler})")
        if not is_int(self.added_noise_level) or not 0 <= self.added_noise_level <= 999:
            fail(f"added_noise_level must be an integer timestep in [0, 999], got {self.added_noise_level!r}")
        if self.ans_mode not in ANS_MODES:
            fail(f"ans_mode must be one of {ANS_MODES}, got {self.ans_mode!r}")
        if not isinstance(self.init_noise, bool):
            fail(f"init_noise must be a bool, got {self.init_noise!r}")
        if not is_int(self.latent_tile_size) or self.latent_tile_size < 1:
            fail(f"latent_tile_size must be a positive integer (latent pixels), got {self.latent_tile_size!r}")
        if (not is_int(self.latent_tile_overlap) or not 0 <= self.latent_tile_overlap < self.latent_tile_size):
            fail(f"latent_tile_overlap must be an integer in [0, latent_tile_size), got {self.latent_tile_overlap!r}")
        if self.tiled_vae not in TILED_VAE_MODES:
            fail(f"tiled_vae must be one of {TILED_VAE_MODES}, got {self.tiled_vae!r}")
        if not is_int(self.vae_encoder_tile) or self.vae_encoder_tile < 64 or self.vae_encoder_tile % 8:
            fail(f"vae_encoder_tile must be a multiple of 8 and >= 64 (image pixels), got {self.vae_encoder_tile!r}")
        if not is_int(self.vae_decoder_tile) or self.vae_decoder_tile < 8:
            fail(f"vae_decoder_tile must be an integer >= 8 (latent pixels), got {self.vae_decoder_tile!r}")
        if self.dtype not in DTYPES:
            fail(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not is_int(self.tile_batch) or self.tile_batch < 1:
            fail(f"tile_batch must be a positive integer, got {self.tile_batch!r}")

    @property
    def use_cfg(self) -> bool:
        """The official pipeline runs classifier-free guidance only when guidance_scale > 1."""
        return self.guidance_scale > 1.0


class SampleResult(NamedTuple):
    """`PASDPipeline.run` output; the float fields are None unless `debug=True`."""
    images: np.ndarray                 # [B, H, W, 3] uint8, before colour fix
    z_n: np.ndarray | None = None      # [B, 4, h, w] starting latent
    latents: np.ndarray | None = None  # [steps, B, 4, h, w] latent after every step
    decoded: np.ndarray | None = None  # [B, 3, H, W] VAE output, unclamped
    tiled: bool = False                # took the latent-tiling path
    devices: int = 1                   # devices the images (untiled) or tile chunks (tiled) were split over


class _Placed(NamedTuple):
    modules: Models
    params: dict


class PASDPipeline:
    """Compiled PASD sampling over a device mesh; see the module docstring.

    Params are cast to each requested dtype once and kept replicated on the mesh; pass host (numpy) params or
    params already in the compute dtype, or the device also keeps the originals. `eps_fn_factory(modules)` builds
    the guided noise estimate (ControlNet + UNet + CFG); tests swap in stand-ins before the first call.
    """

    def __init__(self, models: Models, scheduler_config: Mapping[str, Any] | str | pathlib.Path,
                 tokenizer: Any, *, devices: Sequence[Any] | None = None):
        if not isinstance(models, Models):
            raise TypeError(f"models must be a pasd_jax.sampling.pipeline.Models, got {type(models).__name__}")
        self.models = models
        self.scheduler_config = load_config(scheduler_config)
        self.tokenizer = load_tokenizer(tokenizer)
        self.mesh = sharding.make_mesh(devices)
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._programs: dict[tuple, Callable] = {}
        self._placed: dict[str, _Placed] = {}
        self._cast_fns: dict[str, Callable] = {}
        self._schedulers: dict[tuple, Any] = {}
        self.text = TextEncoderCache(self.tokenizer, lambda dt: self._place(dt).modules.text_encoder,
                                     lambda dt: self._place(dt).params["text_encoder"], self._traced)
        self.eps_fn_factory: Callable[[Models], core.EpsFn] = lambda m: core.make_guided_eps(m.unet, m.controlnet)

    def set_params(self, models: Models) -> None:
        """New weights for the same modules (validation samples during training): params are arguments of the
        compiled programs, so every program is kept; only the placed (cast, replicated) copies are redone."""
        if not isinstance(models, Models):
            raise TypeError(f"models must be a pasd_jax.sampling.pipeline.Models, got {type(models).__name__}")
        for name in ("unet", "controlnet", "vae", "text_encoder"):
            if getattr(models, name) != getattr(self.models, name):
                raise ValueError(f"set_params: the {name} module differs; build a new PASDPipeline for new modules")
        self.models = models
        self.release()

    def release(self) -> None:
        """Drop the placed (cast, replicated) params and cached embeddings, keeping the compiled programs: a
        training run calls this after its validation samples so the copies do not hold device memory."""
        self._placed.clear()
        self.text.clear()

    # --- bookkeeping ------------------------------------------------------------------------------------------

    @property
    def trace_count(self) -> int:
        """Total traces of every program (text encoder, draws, samplers): a cached program never adds to it."""
        return sum(self.trace_counts.values())

    def _traced(self, name: str) -> None:
        self.trace_counts[name] += 1

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.models.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.models.vae.config.latent_channels)

    def scheduler(self, kind: str, steps: int, eta: float = 0.0) -> Any:
        key = (kind, int(steps), float(eta))
        if key not in self._schedulers:
            self._schedulers[key] = scheduler_from_config(self.scheduler_config, kind, int(steps),
                                                          **({"eta": eta} if kind == "ddim" else {}))
        return self._schedulers[key]

    def _place(self, dtype_name: str) -> _Placed:
        """Modules computing in `dtype` and their params cast to it, replicated over the mesh (cached)."""
        if dtype_name not in self._placed:
            dt = DTYPES[dtype_name]
            m = self.models
            modules = Models(m.unet.clone(dtype=dt), None, m.controlnet.clone(dtype=dt), None,
                             m.vae.clone(dtype=dt), None, m.text_encoder.clone(dtype=dt), None)
            tree = {"unet": m.unet_params, "controlnet": m.controlnet_params, "vae": m.vae_params,
                    "text_encoder": m.text_encoder_params}

            def needs_cast(x) -> bool:
                return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt

            rep = sharding.replicated(self.mesh)
            if any(needs_cast(x) for x in jax.tree_util.tree_leaves(tree)):
                if dtype_name not in self._cast_fns:  # one program per dtype, reused by set_params
                    self._cast_fns[dtype_name] = jax.jit(
                        lambda t: jax.tree_util.tree_map(lambda x: x.astype(dt) if needs_cast(x) else x, t),
                        out_shardings=rep)
                params = self._cast_fns[dtype_name](tree)
            else:
                params = jax.device_put(tree, rep)
            self._placed[dtype_name] = _Placed(modules, params)
        return self._placed[dtype_name]

    def _program(self, key: tuple, build: Callable[[], Callable]) -> Callable:
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]

    # --- inputs -----------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return tokenize(self.tokenizer, prompts)

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str], dtype: str = "float32",
                       cfg: bool = True) -> jax.Array:
        """[B, 2, 77, D] ([negative, positive]) with CFG, else [B, 1, 77, D] (cached per distinct prompt)."""
        pos = self.text.encode(prompts, DTYPES[dtype])
        if not cfg:
            return pos[:, None]
        return jnp.stack([self.text.encode(negative_prompts, DTYPES[dtype]), pos], axis=1)

    def _draws_from_keys(self, keys: jax.Array, latent_shape: tuple[int, int, int], init_noise: bool,
                         variance_steps: int, placement: Any) -> dict[str, jax.Array]:
        key = ("draws", keys.shape, str(keys.dtype), latent_shape, init_noise, variance_steps, placement)

        def build():
            def draw(keys):
                self._traced("draws")

                def one(k):
                    k_a, k_b, k_c, k_d = jax.random.split(k, 4)
                    if init_noise:
                        return {"noise": jax.random.normal(k_a, latent_shape, jnp.float32),
                                "offset_noise": jax.random.normal(k_b, latent_shape[:1] + (1, 1), jnp.float32)}
                    d = {"posterior": jax.random.normal(k_a, latent_shape, jnp.float32),
                         "noise": jax.random.normal(k_b, latent_shape, jnp.float32),
                         "added_noise": jax.random.normal(k_c, latent_shape, jnp.float32)}
                    if variance_steps:
                        d["variance"] = jax.random.normal(k_d, (variance_steps,) + latent_shape, jnp.float32)
                    return d
                return jax.vmap(one)(keys)
            return jax.jit(draw, out_shardings=placement)
        return self._program(key, build)(keys)

    def _check_draws(self, draws: Mapping[str, Any], b: int, latent_shape: tuple[int, int, int], init_noise: bool,
                     variance_steps: int) -> dict[str, np.ndarray]:
        names = DRAW_NAMES_INIT_NOISE if init_noise else DRAW_NAMES_ANS
        shapes = {n: (b,) + latent_shape for n in names}
        if init_noise:
            shapes["offset_noise"] = (b, latent_shape[0], 1, 1)
        if variance_steps:
            shapes["variance"] = (b, variance_steps) + latent_shape
        missing = [n for n in shapes if n not in draws]
        extra = [n for n in draws if n not in shapes]
        if missing or extra:
            raise ValueError(f"draws must hold exactly {sorted(shapes)}; missing {missing}, unexpected {extra}")
        out = {}
        for n, shape in shapes.items():
            a = np.asarray(draws[n], np.float32)
            if a.shape != shape:
                raise ValueError(f"draws[{n!r}] must have shape {shape}, got {a.shape}")
            out[n] = a
        return out

    # --- sampling ---------------------------------------------------------------------------------------------

    def sample(self, images_u8: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str],
               keys: jax.Array | None, options: SamplingOptions, *, draws: Mapping[str, Any] | None = None,
               pad_to: int | None = None) -> np.ndarray:
        """[B, H, W, 3] uint8 pipeline output (before colour fix). `pad_to` pads the batch (with copies of the
        last image) to that size so a short final batch reuses the full batch's program."""
        return self.run(images_u8, prompts, negative_prompts, keys, options, draws=draws, pad_to=pad_to).images

    def run(self, images_u8: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str],
            keys: jax.Array | None, options: SamplingOptions, *, draws: Mapping[str, Any] | None = None,
            pad_to: int | None = None, debug: bool = False) -> SampleResult:
        """`sample` with more detail: whether the image was tiled, how many devices shared the batch, and with
        `debug=True` also z_N, the latent after every step and the float decoder output (same compiled program)."""
        if not isinstance(options, SamplingOptions):
            raise TypeError(f"options must be SamplingOptions, got {type(options).__name__}")
        images = np.asarray(images_u8)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
        b, hh, ww, _ = images.shape
        f = self.latent_factor
        if b < 1 or hh < f or ww < f or hh % f or ww % f:
            raise ValueError(f"image height and width must be positive multiples of {f}, got {hh}x{ww} (batch {b})")
        prompts, negative_prompts = list(prompts), list(negative_prompts)
        if len(negative_prompts) == 1 and b > 1:
            negative_prompts = negative_prompts * b
        if len(prompts) != b or len(negative_prompts) != b:
            raise ValueError(f"need one prompt and one negative prompt per image: {b} images, {len(prompts)} "
                             f"prompts, {len(negative_prompts)} negative prompts")
        latent_shape = (self.latent_channels, hh // f, ww // f)
        variance_steps = options.steps if (options.scheduler == "ddim" and options.eta > 0) else 0
        n_dev = self.mesh.size
        tiled = tiling.needs_tiling(hh // f, ww // f, options.latent_tile_size)
        # Untiled, images are the parallel unit: pad the batch to a multiple of the device count. Tiled, tiles are
        # (chunks of tile_batch, a multiple of it): whole-image arrays stay replicated and the batch unpadded.
        bp = max(b, int(pad_to or 0))
        if not tiled:
            bp = sharding.round_up(bp, n_dev)
        placement = sharding.batch_sharded(self.mesh) if bp % n_dev == 0 else sharding.replicated(self.mesh)

        if draws is not None:
            drawn = self._check_draws(draws, b, latent_shape, options.init_noise, variance_steps)
            drawn = {k: sharding.pad_leading(v, bp) for k, v in drawn.items()}
        else:
            if keys is None:
                raise ValueError("pass one PRNG key per image (keys) or the draws")
            keys = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
            nk = keys.shape[0] if keys.ndim else 0
            if nk != b:
                raise ValueError(f"need one PRNG key per image: {b} images, keys of shape {keys.shape}")
            drawn = self._draws_from_keys(sharding.pad_leading(keys, bp), latent_shape, options.init_noise,
                                          variance_steps, placement)
        sched = self.scheduler(options.scheduler, options.steps, options.eta)
        context = self.encode_prompts(prompts, negative_prompts, options.dtype, options.use_cfg)
        put = lambda x: jax.device_put(sharding.pad_leading(x, bp), placement)  # noqa: E731
        images_d, context_d = put(images), put(context)
        drawn = {k: jax.device_put(v, placement) for k, v in drawn.items()}

        if options.init_noise:
            ans = np.zeros(4, np.float32)
        else:
            c = ans_coefficients(sched, options.added_noise_level, options.ans_mode)
            ans = np.asarray([*c.first, *c.second], np.float32)
        rep = sharding.replicated(self.mesh)
        scalars = core.Scalars(*(jax.device_put(np.asarray(v, np.float32), rep) for v in (
            options.guidance_scale, options.conditioning_scale, ans, options.offset_noise_scale)))
        vt = vae_tiling.resolve_vae_tiling(options.tiled_vae, hh, ww, options.vae_encoder_tile,
                                           options.vae_decoder_tile, f)
        if tiled:
            out = self._run_tiled(options, sched, vt, images_d, context_d, drawn, scalars, debug)
        else:
            out = self._run_untiled(options, sched, vt, images_d, context_d, drawn, scalars)
        split = out.get("split", out["images"]).sharding
        devices = 1 if split.is_fully_replicated else len(split.device_set)
        crop = lambda x, axis=0: np.asarray(x).take(range(b), axis=axis)  # noqa: E731
        if not debug:
            return SampleResult(images=crop(out["images"]), tiled=out["tiled"], devices=devices)
        return SampleResult(images=crop(out["images"]), z_n=crop(out["z_n"]), latents=crop(out["latents"], 1),
                            decoded=crop(out["decoded"]), tiled=out["tiled"], devices=devices)

    def _static_key(self, options: SamplingOptions, vt: vae_tiling.VAETiling) -> tuple:
        """What the untiled program's structure depends on beyond the input shapes."""
        return (options.scheduler, options.steps, float(options.eta), options.dtype, options.init_noise,
                vt.encoder_tile, vt.decoder_tile)

    def _run_untiled(self, options, sched, vt, images, context, drawn, scalars) -> dict:
        placed = self._place(options.dtype)
        key = ("untiled", images.shape, context.shape, self._static_key(options, vt))
        variance_steps = drawn["variance"].shape[1] if "variance" in drawn else 0

        def build():
            eps_fn = self.eps_fn_factory(placed.modules)
            vae = placed.modules.vae
            mesh = self.mesh

            def program(params, images, context, drawn, scalars):
                # The per-step latents and the float decoder output are returned too: they cost a few MB, and a
                # separate debug program would be a second compilation of the whole pipeline.
                self._traced("untiled")
                cond = core.condition_image(images)
                z0 = core.initial_latents(vae, params["vae"], cond, drawn, scalars, init_noise=options.init_noise,
                                          encoder_tile=vt.encoder_tile, init_noise_sigma=sched.init_noise_sigma)
                z0 = sharding.constrain_batch(z0, mesh)
                variance = jnp.swapaxes(drawn["variance"], 0, 1) if variance_steps else None
                z, inter = core.denoise(eps_fn, params, sched, z0, context, cond, scalars, variance,
                                        return_intermediates=True,
                                        constrain=lambda x: sharding.constrain_batch(x, mesh))
                u8, decoded = core.decode_images(vae, params["vae"], z, vt.decoder_tile)
                return {"images": u8, "z_n": z0, "latents": inter, "decoded": decoded}
            return jax.jit(program)
        params = {k: placed.params[k] for k in ("unet", "controlnet", "vae")}
        out = self._program(key, build)(params, images, context, drawn, scalars)
        out["tiled"] = False
        return out

    def tile_batch(self, options: SamplingOptions) -> int:
        """Tiles per model call: `options.tile_batch` rounded up to a multiple of the device count."""
        return sharding.round_up(options.tile_batch, self.mesh.size)

    def _tile_model(self, options: SamplingOptions, tile: int, context_tail: tuple) -> Callable:
        """The shared ControlNet + UNet program of the tiled path: one chunk of `tile_batch(options)` tiles of side
        `tile` (keyed by nothing size-dependent, so every large image reuses it)."""
        placed = self._place(options.dtype)
        chunk = self.tile_batch(options)
        mesh = self.mesh

        def build():
            eps_fn = self.eps_fn_factory(placed.modules)

            def model(params, z, t, context, cond, guidance, cond_scale):
                self._traced("tiled_model")
                constrain = lambda x: sharding.constrain_batch(x, mesh)  # noqa: E731
                return constrain(eps_fn(params, constrain(z), t, context, cond, guidance, cond_scale))
            return jax.jit(model)
        return self._program(("tiled_model", chunk, tile, tuple(context_tail), options.dtype), build)

    def tile_noise_fn(self, options: SamplingOptions, tile: int) -> Callable[..., jax.Array]:
        """The tiled path's guided noise estimate for one chunk of tiles, as the sampler calls it:
        f(z [c, 4, tile, tile], t, context [c, k, 77, D], cond [c, 3, 8 tile, 8 tile]) -> eps [c, 4, tile, tile] with
        c = tile_batch(options), k = 2 with guidance (else 1), and the options' guidance and conditioning scale
        (for tests and benchmarks)."""
        placed = self._place(options.dtype)
        k = 2 if options.use_cfg else 1
        params = {"unet": placed.params["unet"], "controlnet": placed.params["controlnet"]}
        scal = [jnp.asarray(v, jnp.float32) for v in (options.guidance_scale, options.conditioning_scale)]

        batch, rep = sharding.batch_sharded(self.mesh), sharding.replicated(self.mesh)
        scal = [jax.device_put(v, rep) for v in scal]

        def f(z, t, context, cond):
            model = self._tile_model(options, tile, tuple(np.shape(context)[1:]))
            if np.shape(context)[1] != k:
                raise ValueError(f"context must hold {k} prompt(s) per tile for these options")
            put = lambda x, dt: jax.device_put(jnp.asarray(x, dt), batch)  # noqa: E731
            return model(params, put(z, jnp.float32), jax.device_put(jnp.asarray(t, jnp.int32), rep),
                         put(context, DTYPES[options.dtype]), put(cond, DTYPES[options.dtype]), *scal)
        return f

    def _run_tiled(self, options, sched, vt, images, context, drawn, scalars, debug) -> dict:
        placed = self._place(options.dtype)
        h, w = images.shape[1] // self.latent_factor, images.shape[2] // self.latent_factor
        layout = tiling.tile_layout(h, w, options.latent_tile_size, options.latent_tile_overlap)
        chunk = self.tile_batch(options)
        variance_steps = drawn["variance"].shape[1] if "variance" in drawn else 0
        mesh = self.mesh
        vae = placed.modules.vae
        constrain = lambda x: sharding.constrain_batch(x, mesh)  # noqa: E731  (tile chunks only)
        cond_dtype = DTYPES[options.dtype]

        def build_prepare():
            def prepare(params, images, context, drawn, scalars):
                self._traced("tiled_prepare")
                cond = core.condition_image(images)
                z0 = core.initial_latents(vae, params["vae"], cond, drawn, scalars, init_noise=options.init_noise,
                                          encoder_tile=vt.encoder_tile, init_noise_sigma=sched.init_noise_sigma)
                cond_chunks, ctx_chunks = core.tile_inputs(cond, context, layout, chunk, cond_dtype)
                return (z0, sched.init_carry(z0), tuple(map(constrain, core.latent_tiles(z0, layout, chunk))),
                        tuple(map(constrain, cond_chunks)), tuple(map(constrain, ctx_chunks)))
            return jax.jit(prepare)

        def build_step():
            def step(carry, i, eps_chunks, variance):
                self._traced("tiled_step")
                carry, z_chunks = core.tiled_update(sched, layout, chunk, carry, i, eps_chunks, variance)
                return carry, tuple(map(constrain, z_chunks))
            return jax.jit(step)

        def build_finish():
            def finish(params, z):
                self._traced("tiled_finish")
                return core.decode_images(vae, params["vae"], z, vt.decoder_tile)
            return jax.jit(finish)

        # Keys hold exactly what each program's shapes and constants depend on.
        prepare = self._program(("tiled_prepare", images.shape, context.shape, layout, chunk, options.scheduler,
                                 options.init_noise, vt.encoder_tile, options.dtype, variance_steps), build_prepare)
        step = self._program(("tiled_step", images.shape, layout, chunk, options.scheduler, options.steps,
                              float(options.eta)), build_step)
        finish = self._program(("tiled_finish", images.shape, vt.decoder_tile, options.dtype), build_finish)
        model = self._tile_model(options, layout.tile, context.shape[1:])

        vae_params = {"vae": placed.params["vae"]}
        z0, carry, z_chunks, cond_chunks, ctx_chunks = prepare(vae_params, images, context, drawn, scalars)
        model_params = {"unet": placed.params["unet"], "controlnet": placed.params["controlnet"]}
        rep = sharding.replicated(mesh)
        timesteps = [jax.device_put(np.int32(t), rep) for t in np.asarray(sched.timesteps)]
        inter = []
        for i, t in enumerate(timesteps):
            eps = tuple(model(model_params, z, t, ctx, cond, scalars.guidance, scalars.cond_scale)
                        for z, ctx, cond in zip(z_chunks, ctx_chunks, cond_chunks))
            var = drawn["variance"][:, i] if variance_steps else None
            carry, z_chunks = step(carry, jax.device_put(np.int32(i), rep), eps, var)
            if debug:
                inter.append(carry.sample)
        u8, decoded = finish(vae_params, carry.sample)
        out = {"images": u8, "tiled": True, "split": z_chunks[0]}
        if debug:
            out.update(z_n=z0, latents=jnp.stack(inter), decoded=decoded)
        return out
