"""PASD sampling: loading weights for it, the compiled pipeline, and running it over files.

    from pasd_jax.sampling import PASDPipeline, SamplingOptions, load_for_sampling
    loaded = load_for_sampling("runs/pasd/checkpoint-100000", base="checkpoints/stable-diffusion-v1-5")
    pipe = PASDPipeline(loaded.models, loaded.params, loaded.scheduler_config, loaded.tokenizer_dir)

Modules: `options` (SamplingOptions), `pipeline` (the compiled untiled program and the entry point), `tiled` (the
latent-tiling path), `tiling` (its geometry and blending), `denoise` (the traced building blocks), `draws`,
`text` (prompt embeddings), `vae_tiling`, `loading`, `runner` (files in, files out) and `cli` (`pasd-sample`).
"""
from pasd_jax.sampling.loading import Loaded, load_for_sampling
from pasd_jax.sampling.options import SampleResult, SamplingOptions
from pasd_jax.sampling.pipeline import PASDPipeline

__all__ = ["Loaded", "PASDPipeline", "SampleResult", "SamplingOptions", "load_for_sampling"]
