"""Validation samples during training: a fixed set of LQ images super-resolved with the current weights.

Every `validation.every` steps (and at the end) the images under `validation.images` go through the same path as
`sample.py` (official preprocessing, per-image seeds from `validation.seed` and the file name, colour fix) and are
written to `<workdir>/validation/step_<N>/`. The sampling programs compile once: later validations only pass new
params. One process samples on all devices in place; with several processes the params are first gathered to the
hosts (a collective every process joins; the frozen base once per run) and process 0 samples on its own devices.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax

from pasd_jax.sampling import runner
from pasd_jax.sampling.options import SamplingOptions
from pasd_jax.sampling.pipeline import PASDPipeline
from pasd_jax import sharding
from pasd_jax.sharding import trainable_split
from pasd_jax.models.bundle import Models

VALIDATION_DIR = "validation"


def validation_options(v) -> tuple[SamplingOptions, runner.RunSettings]:
    options = SamplingOptions(steps=int(v.steps), scheduler=str(v.scheduler), guidance_scale=float(v.guidance_scale),
                              added_noise_level=int(v.added_noise_level), dtype=str(v.dtype))
    settings = runner.RunSettings(upscale=int(v.upscale), process_size=int(v.process_size), seed=int(v.seed),
                                  negative_prompt=str(v.negative_prompt), overwrite=True,
                                  task=str(v.get("task", "sr")))  # "colorize" for colorization runs
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
        self._frozen_host: Any = None
        self._frozen_gathered = False

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.last)

    def __call__(self, step: int, trainable: Any, frozen: Any) -> runner.Summary | None:
        """Sample and write; None on processes other than 0."""
        devices = None
        if jax.process_count() > 1:
            trainable = sharding.to_host(trainable)
            if not self._frozen_gathered:  # once per run; only process 0 keeps it
                gathered = sharding.to_host(frozen)
                self._frozen_host = gathered if jax.process_index() == 0 else None
                self._frozen_gathered = True
            frozen = self._frozen_host
            if jax.process_index() != 0:
                return None
            devices = jax.local_devices()
        params = {"unet": trainable_split.merge(frozen["unet"], trainable["unet"]),
                  "controlnet": trainable["controlnet"], "vae": frozen["vae"], "text_encoder": frozen["text_encoder"]}
        if self.pipeline is None:
            self.pipeline = PASDPipeline(self.models, params, self.scheduler, self.tokenizer, devices=devices)
        else:
            self.pipeline.set_params(params)
        prompt = str(self.v.prompt)
        try:
            return runner.run(self.pipeline, self.options, self.v.images,
                              self.workdir / VALIDATION_DIR / f"step_{step}", self.settings,
                              lambda image, rel: prompt, progress=False)
        finally:
            self.pipeline.release()  # the replicated copies would otherwise sit in device memory until next time
