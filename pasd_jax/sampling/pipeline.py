"""The PASD sampler: official pipeline semantics (spec 4.4-4.10) as compiled, cached, sharded JAX programs.

    pipe = PASDPipeline(models, params, "<sd15>/scheduler", "<sd15>/tokenizer")
    out = pipe.sample(images_u8, prompts, negative_prompts, keys, SamplingOptions(steps=20))

`sample` returns the pipeline's images before the colour fix, round(clamp(x / 2 + 0.5) * 255) as uint8, like the
official pipeline's `.images`; colour fix, resizing and file I/O belong to the caller (`sample.py`).

Programs and compilation
- Untiled images (latent h * w <= T^2): ONE jitted program per (batch, processed size, steps, scheduler, dtype,
  shape-changing options): VAE encode, posterior sample, ANS, the denoising loop as `lax.scan` (ControlNet + PASD
  UNet + CFG + scheduler step), VAE decode and the uint8 conversion. Guidance, conditioning scale, ANS level/mode
  and offset-noise scale are runtime arrays, so changing them reuses the program.
- Large images (h * w > T^2): the official latent tiling (spec 4.7), in `sampling.tiled`: one ControlNet + UNet
  program of the fixed tile size shared by every image size, plus three cheap size-dependent programs.
- The VAE (tiled above the official thresholds; exact, see `vae_tiling`) is part of the untiled program and of
  the cheap per-size programs of the tiled path.
- Every program lives in an explicit cache keyed by everything that changes its shapes or structure;
  `trace_counts` counts traces per program kind (`trace_count` is their sum), which the tests check.

Randomness: each image's draws come from its own key (`sampling.draws`); `draws=` injects tensors instead (the
recorded golden draws). Results thus do not depend on batch composition.

Precision: `dtype` casts all frozen params and the model compute; latents, the scheduler, the guidance arithmetic,
norm statistics, softmax and the final convs stay fp32 (the official keeps fp16 latents; fp32 is strictly better).

Devices: a mesh with every device (or `devices=`) on `data`, params replicated. Untiled, the batch is padded to a
multiple of the device count (copies of the last image, dropped) and split by image. Tiled, the unit of
parallelism is the tile chunk.
"""
from __future__ import annotations

import collections
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax import sharding
from pasd_jax.convert.base import to_device
from pasd_jax.models.bundle import COMPONENTS, Models
from pasd_jax.sampling import denoise as core
from pasd_jax.sampling import draws as draws_lib
from pasd_jax.sampling import tiled as tiled_path
from pasd_jax.sampling import tiling, vae_tiling, xla_options
from pasd_jax.sampling.options import DTYPES, SampleResult, SamplingOptions
from pasd_jax.sampling.text import TextEncoderCache
from pasd_jax.schedulers import ans_coefficients, scheduler_from_config
from pasd_jax.schedulers.schedule import load_config
from pasd_jax.tokenizer import load_tokenizer, tokenize

EpsFactory = Callable[[Models], core.EpsFn]
StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def guided_eps(modules: Models) -> core.EpsFn:
    """The real noise estimate: ControlNet + PASD UNet + classifier-free guidance."""
    return core.make_guided_eps(modules.unet, modules.controlnet)


class Placed(NamedTuple):
    modules: Models
    params: dict


def _check_params(models: Models, params: Mapping[str, Any]) -> dict:
    if not isinstance(models, Models):
        raise TypeError(f"models must be a pasd_jax.models.bundle.Models, got {type(models).__name__}")
    missing = [c for c in COMPONENTS if c not in params]
    if missing:
        raise ValueError(f"params must hold a tree for each of {COMPONENTS}; missing {missing}")
    return {c: params[c] for c in COMPONENTS}


class PASDPipeline:
    """Compiled PASD sampling over a device mesh; see the module docstring.

    Params are cast to each requested dtype once and kept replicated on the mesh; pass host (numpy) params or
    params already in the compute dtype, or the device also keeps the originals. `eps_fn_factory(modules)` builds
    the guided noise estimate (default: ControlNet + UNet + CFG; tests pass stand-ins).
    """

    def __init__(self, models: Models, params: Mapping[str, Any], scheduler_config: Mapping[str, Any] | str |
                 pathlib.Path, tokenizer: Any, *, devices: Sequence[Any] | None = None,
                 eps_fn_factory: EpsFactory = guided_eps):
        self.models = models
        self.params = _check_params(models, params)
        self.scheduler_config = load_config(scheduler_config)
        self.tokenizer = load_tokenizer(tokenizer)
        self.mesh = sharding.make_mesh(devices=devices)
        self.eps_fn_factory = eps_fn_factory
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._programs: dict[tuple, Callable] = {}
        self._placed: dict[str, Placed] = {}
        self._cast_fns: dict[str, Callable] = {}
        self._schedulers: dict[tuple, Any] = {}
        self._on_step: StepCallback | None = None
        self.text = TextEncoderCache(self.tokenizer, lambda dt: self.place(dt).modules.text_encoder,
                                     lambda dt: self.place(dt).params["text_encoder"], self.traced)

    def set_params(self, params: Mapping[str, Any]) -> None:
        """New weights for the same modules (validation samples during training): params are arguments of the
        compiled programs, so every program is kept; only the placed (cast, replicated) copies are redone."""
        self.params = _check_params(self.models, params)
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

    def traced(self, name: str) -> None:
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

    def place(self, dtype_name: str) -> Placed:
        """Modules computing in `dtype` and their params cast to it, replicated over the mesh (cached)."""
        if dtype_name not in self._placed:
            dt = DTYPES[dtype_name]
            modules = self.models.clone(dtype=dt)
            tree = self.params

            def needs_cast(x) -> bool:
                return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt

            rep = sharding.replicated(self.mesh)
            if all(isinstance(x, np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating)
                   for x in jax.tree_util.tree_leaves(tree)):  # cast on the host leaf by leaf (no fp32 device copy)
                params = to_device(tree, dt, rep)
            elif any(needs_cast(x) for x in jax.tree_util.tree_leaves(tree)):
                if dtype_name not in self._cast_fns:  # one program per dtype, reused by set_params
                    self._cast_fns[dtype_name] = jax.jit(
                        lambda t: jax.tree_util.tree_map(lambda x: x.astype(dt) if needs_cast(x) else x, t),
                        out_shardings=rep)
                params = self._cast_fns[dtype_name](tree)
            else:
                params = jax.device_put(tree, rep)
            self._placed[dtype_name] = Placed(modules, params)
        return self._placed[dtype_name]

    def program(self, key: tuple, build: Callable[[], Callable]) -> Callable:
        """The compiled program cached under `key` (built on first use)."""
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
                self.traced("draws")
                return jax.vmap(lambda k: draws_lib.draw_one(k, latent_shape, init_noise, variance_steps))(keys)
            return jax.jit(draw, out_shardings=placement)
        return self.program(key, build)(keys)

    # --- sampling ---------------------------------------------------------------------------------------------

    def sample(self, images_u8: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str],
               keys: jax.Array | None, options: SamplingOptions, *, draws: Mapping[str, Any] | None = None,
               pad_to: int | None = None, on_step: StepCallback | None = None) -> np.ndarray:
        """[B, H, W, 3] uint8 pipeline output (before colour fix). `pad_to` pads the batch (with copies of the
        last image) to that size so a short final batch reuses the full batch's program."""
        return self.run(images_u8, prompts, negative_prompts, keys, options, draws=draws, pad_to=pad_to,
                        on_step=on_step).images

    def run(self, images_u8: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str],
            keys: jax.Array | None, options: SamplingOptions, *, draws: Mapping[str, Any] | None = None,
            pad_to: int | None = None, debug: bool = False, on_step: StepCallback | None = None) -> SampleResult:
        """`sample` with more detail: whether the image was tiled, how many devices shared the batch, and with
        `debug=True` also z_N, the latent after every step and the float decoder output (same compiled program).

        `on_step(done, total)` is called on the host after every denoising step while the program runs (a host
        callback from inside the one `lax.scan`; the program with it is a separate cache entry and gives the
        same numbers)."""
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
        sched = self.scheduler(options.scheduler, options.steps, options.eta)
        # per-step scheduler noise (DDIM with eta > 0, LCM's re-noising between steps), one draw per step
        variance_steps = options.steps if sched.needs_step_noise else 0
        n_dev = self.mesh.size
        tiled = tiling.needs_tiling(hh // f, ww // f, options.latent_tile_size)
        # Untiled, images are the parallel unit: pad the batch to a multiple of the device count. Tiled, tiles are
        # (chunks of tile_batch, a multiple of it): whole-image arrays stay replicated and the batch unpadded.
        bp = max(b, int(pad_to or 0))
        if not tiled:
            bp = sharding.round_up(bp, n_dev)
        placement = sharding.batch_sharded(self.mesh) if bp % n_dev == 0 else sharding.replicated(self.mesh)

        if draws is not None:
            drawn = draws_lib.check_draws(draws, b, latent_shape, options.init_noise, variance_steps)
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
            out = tiled_path.run_tiled(self, options, sched, vt, images_d, context_d, drawn, scalars, debug,
                                       on_step=on_step)
        else:
            self._on_step = on_step
            try:
                out = self._run_untiled(options, sched, vt, images_d, context_d, drawn, scalars, on_step is not None)
                jax.block_until_ready(out["images"])  # every step's callback has run before we return
            finally:
                self._on_step = None
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

    def _step_done(self, i: Any, _z: Any, total: int) -> None:
        """Host side of the in-scan progress callback: forwards to the `on_step` of the running call."""
        if self._on_step is not None:
            self._on_step(int(i) + 1, total)

    def _run_untiled(self, options, sched, vt, images, context, drawn, scalars, progress: bool = False) -> dict:
        placed = self.place(options.dtype)
        key = ("untiled", images.shape, context.shape, self._static_key(options, vt), progress)
        total = int(sched.num_inference_steps)
        report = ((lambda i, z: jax.debug.callback(self._step_done, i, z.reshape(-1)[0], total))  # noqa: E731
                  if progress else None)
        variance_steps = drawn["variance"].shape[1] if "variance" in drawn else 0

        def build():
            eps_fn = self.eps_fn_factory(placed.modules)
            vae = placed.modules.vae
            mesh = self.mesh

            def program(params, images, context, drawn, scalars):
                # The per-step latents and the float decoder output are returned too: they cost a few MB, and a
                # separate debug program would be a second compilation of the whole pipeline.
                self.traced("untiled")
                cond = core.condition_image(images)
                z0 = core.initial_latents(vae, params["vae"], cond, drawn, scalars, init_noise=options.init_noise,
                                          encoder_tile=vt.encoder_tile, init_noise_sigma=sched.init_noise_sigma)
                z0 = sharding.constrain_batch(z0, mesh)
                variance = jnp.swapaxes(drawn["variance"], 0, 1) if variance_steps else None
                z, inter = core.denoise(eps_fn, params, sched, z0, context, cond, scalars, variance, on_step=report,
                                        return_intermediates=True,
                                        constrain=lambda x: sharding.constrain_batch(x, mesh))
                u8, decoded = core.decode_images(vae, params["vae"], z, vt.decoder_tile)
                return {"images": u8, "z_n": z0, "latents": inter, "decoded": decoded}
            return xla_options.jit(program)
        params = {k: placed.params[k] for k in ("unet", "controlnet", "vae")}
        out = self.program(key, build)(params, images, context, drawn, scalars)
        out["tiled"] = False
        return out

    def tile_batch(self, options: SamplingOptions) -> int:
        """Tiles per model call in the tiled path (`options.tile_batch` rounded up to the device count)."""
        return tiled_path.tile_batch(self, options)

    def tile_noise_fn(self, options: SamplingOptions, tile: int) -> Callable[..., jax.Array]:
        """The tiled path's guided noise estimate for one chunk of tiles (see `tiled.tile_noise_fn`)."""
        return tiled_path.tile_noise_fn(self, options, tile)
