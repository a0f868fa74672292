"""The latent-tiling path of the sampler (spec 4.7), for images whose latent area exceeds T^2.

The expensive part, ControlNet + UNet on a chunk of `tile_batch` tiles of the fixed tile side T' = min(T, h, w)
(with their CFG pairs), is one program shared by every image size. The size-dependent parts are three cheap
programs without any network in the loop: prepare (VAE encode, ANS, cut latent/condition tiles), step (Gaussian
blend of the tile outputs, scheduler step, re-cut; the step index is traced, so one program serves all steps) and
finish (decode). The step loop is a Python loop: each step runs ceil(tiles / tile_batch) model calls of a few
hundred ms, so dispatch costs nothing measurable, while one `lax.scan` would tie the UNet's compilation to the
image size. `tile_batch` defaults to 2: one 320x320-latent tile with its CFG pair is already 2 x 25 times the work
of a 512 image, which saturates a GPU. Guidance is applied per tile before blending (both are linear, so this
equals the official order up to rounding). Tile chunks are split over the devices; the cheap whole-image work is
replicated unless the batch divides evenly, so one large image uses every device without being duplicated.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax import sharding
from pasd_jax.sampling import denoise as core
from pasd_jax.sampling import tiling, xla_options
from pasd_jax.sampling.options import DTYPES, SamplingOptions


class Pipeline(Protocol):
    """What the tiled path uses of `pipeline.PASDPipeline` (which calls into this module)."""
    mesh: Any
    eps_fn_factory: Callable[[Any], core.EpsFn]
    latent_factor: int

    def place(self, dtype_name: str) -> Any: ...
    def program(self, key: tuple, build: Callable[[], Callable]) -> Callable: ...
    def traced(self, name: str) -> None: ...


def tiled_update(sched: Any, layout: tiling.TileLayout, chunk: int, carry: Any, i: jax.Array,
                 eps_chunks: tuple[jax.Array, ...], variance: jax.Array | None,
                 constrain: Callable[[jax.Array], jax.Array] = lambda x: x) -> tuple[Any, tuple[jax.Array, ...]]:
    """One step after the tile model calls: Gaussian-blend the tiles' guided eps (CFG, being linear like the
    blend, is applied per tile), scheduler step on the whole latent, re-cut the tiles."""
    eps = tiling.blend_chunks(eps_chunks, layout, carry.sample.shape[0])
    _, carry = core.scheduler_step(sched, carry, i, eps, variance)
    carry = carry._replace(sample=constrain(carry.sample))
    return carry, tiling.latent_tiles(carry.sample, layout, chunk)


def tile_batch(pipe: Pipeline, options: SamplingOptions) -> int:
    """Tiles per model call: `options.tile_batch` rounded up to a multiple of the device count."""
    return sharding.round_up(options.tile_batch, pipe.mesh.size)


def tile_model(pipe: Pipeline, options: SamplingOptions, tile: int, context_tail: tuple) -> Callable:
    """The shared ControlNet + UNet program: one chunk of `tile_batch` tiles of side `tile` (keyed by nothing
    size-dependent, so every large image reuses it)."""
    placed = pipe.place(options.dtype)
    chunk = tile_batch(pipe, options)
    mesh = pipe.mesh

    def build():
        eps_fn = pipe.eps_fn_factory(placed.modules)

        def model(params, z, t, context, cond, guidance, cond_scale):
            pipe.traced("tiled_model")
            constrain = lambda x: sharding.constrain_batch(x, mesh)  # noqa: E731
            return constrain(eps_fn(params, constrain(z), t, context, cond, guidance, cond_scale))
        return xla_options.jit(model)
    return pipe.program(("tiled_model", chunk, tile, tuple(context_tail), options.dtype), build)


def tile_noise_fn(pipe: Pipeline, options: SamplingOptions, tile: int) -> Callable[..., jax.Array]:
    """The guided noise estimate for one chunk of tiles, as the sampler calls it (for tests and benchmarks):
    f(z [c, 4, tile, tile], t, context [c, k, 77, D], cond [c, 3, 8 tile, 8 tile]) -> eps [c, 4, tile, tile] with
    c = tile_batch, k = 2 with guidance (else 1), and the options' guidance and conditioning scale."""
    placed = pipe.place(options.dtype)
    k = 2 if options.use_cfg else 1
    params = {"unet": placed.params["unet"], "controlnet": placed.params["controlnet"]}
    batch, rep = sharding.batch_sharded(pipe.mesh), sharding.replicated(pipe.mesh)
    scal = [jax.device_put(jnp.asarray(v, jnp.float32), rep)
            for v in (options.guidance_scale, options.conditioning_scale)]

    def f(z, t, context, cond):
        model = tile_model(pipe, options, tile, tuple(np.shape(context)[1:]))
        if np.shape(context)[1] != k:
            raise ValueError(f"context must hold {k} prompt(s) per tile for these options")
        put = lambda x, dt: jax.device_put(jnp.asarray(x, dt), batch)  # noqa: E731
        return model(params, put(z, jnp.float32), jax.device_put(jnp.asarray(t, jnp.int32), rep),
                     put(context, DTYPES[options.dtype]), put(cond, DTYPES[options.dtype]), *scal)
    return f


def run_tiled(pipe: Pipeline, options: SamplingOptions, sched: Any, vt: Any, images: jax.Array,
              context: jax.Array, drawn: dict, scalars: core.Scalars, debug: bool,
              on_step: Callable[[int, int], None] | None = None) -> dict:
    placed = pipe.place(options.dtype)
    f = pipe.latent_factor
    layout = tiling.tile_layout(images.shape[1] // f, images.shape[2] // f, options.latent_tile_size,
                                options.latent_tile_overlap)
    chunk = tile_batch(pipe, options)
    variance_steps = drawn["variance"].shape[1] if "variance" in drawn else 0
    mesh = pipe.mesh
    vae = placed.modules.vae
    constrain = lambda x: sharding.constrain_batch(x, mesh)  # noqa: E731  (tile chunks only)
    cond_dtype = DTYPES[options.dtype]

    def build_prepare():
        def prepare(params, images, context, drawn, scalars):
            pipe.traced("tiled_prepare")
            cond = core.condition_image(images)
            z0 = core.initial_latents(vae, params["vae"], cond, drawn, scalars, init_noise=options.init_noise,
                                      encoder_tile=vt.encoder_tile, init_noise_sigma=sched.init_noise_sigma)
            cond_chunks, ctx_chunks = tiling.tile_inputs(cond, context, layout, chunk, cond_dtype)
            return (z0, sched.init_carry(z0), tuple(map(constrain, tiling.latent_tiles(z0, layout, chunk))),
                    tuple(map(constrain, cond_chunks)), tuple(map(constrain, ctx_chunks)))
        return xla_options.jit(prepare)

    def build_step():
        def step(carry, i, eps_chunks, variance):
            pipe.traced("tiled_step")
            carry, z_chunks = tiled_update(sched, layout, chunk, carry, i, eps_chunks, variance)
            return carry, tuple(map(constrain, z_chunks))
        return xla_options.jit(step)

    def build_finish():
        def finish(params, z):
            pipe.traced("tiled_finish")
            return core.decode_images(vae, params["vae"], z, vt.decoder_tile)
        return xla_options.jit(finish)

    # Keys hold exactly what each program's shapes and constants depend on.
    prepare = pipe.program(("tiled_prepare", images.shape, context.shape, layout, chunk, options.scheduler,
                            options.init_noise, vt.encoder_tile, options.dtype, variance_steps), build_prepare)
    step = pipe.program(("tiled_step", images.shape, layout, chunk, options.scheduler, options.steps,
                         float(options.eta)), build_step)
    finish = pipe.program(("tiled_finish", images.shape, vt.decoder_tile, options.dtype), build_finish)
    model = tile_model(pipe, options, layout.tile, context.shape[1:])

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
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    u8, decoded = finish(vae_params, carry.sample)
    out = {"images": u8, "tiled": True, "split": z_chunks[0]}
    if debug:
        out.update(z_n=z0, latents=jnp.stack(inter), decoded=decoded)
    return out
