"""Validation samples during training: a fixed set of LQ images super-resolved with the current weights.

Every `validation.every` steps (and at the end) the images under `validation.images` go through the same path as
`sample.py` (official preprocessing, per-image seeds from `validation.seed` and the file name, colour fix) and are
written to `<workdir>/validation/step_<N>/`. The sampling programs compile once: later validations only pass new
params. Every process takes part (the params are sharded over the mesh); process 0 writes the images.
"""
from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import jax

from pasd_jax.sampling import runner
from pasd_jax.sampling.pipeline import Models as SamplingModels
from pasd_jax.sampling.pipeline import PASDPipeline, SamplingOptions
from pasd_jax.train import partition
from pasd_jax.train.models import Models

VALIDATION_DIR = "validation"


def validation_options(v) -> tuple[SamplingOptions, runner.RunSettings]:
    options = SamplingOptions(steps=int(v.steps), scheduler=str(v.scheduler), guidance_scale=float(v.guidance_scale),
                              added_noise_level=int(v.added_noise_level), dtype=str(v.dtype))
    settings = runner.RunSettings(upscale=int(v.upscale), process_size=int(v.process_size), seed=int(v.seed),
                                  negative_prompt=str(v.negative_prompt), overwrite=True)
    return options, settings


class Validator:
    """Call with (step, trainable params, frozen params) at the steps `due(step)` says."""

    def __init__(self, config, models: Models, workdir: pathlib.Path):
        self.v = config.validation
        self.every, self.last = int(self.v.every), int(config.steps)
        self.models, self.workdir = models, workdir
        self.scheduler, self.tokenizer = config.diffusion.scheduler, config.loader.tokenizer
        self.options, self.settings = validation_options(self.v)
        self.pipeline: PASDPipeline | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.last)

    def __call__(self, step: int, trainable: Any, frozen: Any) -> runner.Summary:
        m = self.models
        params = SamplingModels(m.unet, partition.merge(frozen["unet"], trainable["unet"]),
                                m.controlnet, trainable["controlnet"], m.vae, frozen["vae"],
                                m.text_encoder, frozen["text_encoder"])
        if self.pipeline is None:
            self.pipeline = PASDPipeline(params, self.scheduler, self.tokenizer)
        else:
            self.pipeline.set_params(params)
        prompt = str(self.v.prompt)
        out = self.workdir / VALIDATION_DIR / f"step_{step}"
        if jax.process_index() == 0:
            return runner.run(self.pipeline, self.options, self.v.images, out, self.settings,
                              lambda image, rel: prompt, progress=False)
        with tempfile.TemporaryDirectory() as scratch:  # the others sample too (collectives), and write nothing
            return runner.run(self.pipeline, self.options, self.v.images, scratch, self.settings,
                              lambda image, rel: prompt, progress=False)
