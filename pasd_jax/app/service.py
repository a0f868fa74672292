"""The web UI's engine: models loaded once, one request at a time, on `pasd-sample`'s exact code path.

    session = Session.load(ckpt=None)                       # the embedded tiny models; or ckpt=..., base=...
    result = session.run("photo.png", Settings(steps=20), on_step=lambda done, total: ...)

A request is what `pasd-sample --input photo.png` does for that one file: `read_image`, `tasks.prepare`, the prompt
from the same prompt function, the key `runner.image_key(seed, file name)`, `PASDPipeline.sample`, `tasks.finish`,
a PNG. So the page and the command line give the same image for the same file and settings (tested). The pipeline
is built once per process and keeps its compiled programs: the first request at a processed size (and set of
steps / scheduler / dtype) compiles, later ones reuse it.

Failures a user can fix (not an image, too large, a setting out of range) raise `AppError` with a one-line message
for the page; the session stays usable after any failure.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from pasd_jax import image_ops
from pasd_jax.errors import PasdError
from pasd_jax.image_io import ImageReadError, read_image, write_image
from pasd_jax.prompts import NoneProvider, ObservationCache, PromptFn, classification_provider
from pasd_jax.sampling import tasks
from pasd_jax.convert.io import WeightFileError
from pasd_jax.sampling.loading import Loaded, load_for_sampling, scheduler_beside_checkpoint
from pasd_jax.sampling.pipeline import PASDPipeline
from pasd_jax.sampling.runner import image_key, memory_options
from pasd_jax.app.presets import SAMPLE_DEFAULTS, Settings

log = logging.getLogger(__name__)
StepCallback = Callable[[int, int], None]
TINY_PROCESS_SIZE = 128  # the tiny models are 64-pixel models; 768 would only make a CPU demo slow
KEEP_OUTPUTS = 16        # request folders kept on disk (gradio copies what it serves into its own cache)


class AppError(PasdError, ValueError):
    """A request the app refuses or cannot run; the message is shown in the page as is."""


@dataclasses.dataclass(frozen=True)
class Result:
    image: np.ndarray           # uint8 [H, W, 3], the final output at full resolution (what the PNG holds)
    before: np.ndarray          # the input resized (bicubic) to the output size, for the comparison
    png: pathlib.Path
    prompt: str                 # the positive prompt actually used
    negative_prompt: str
    seed: int
    seconds: float
    compiled: bool              # this request compiled a program (first at its size and settings)
    processed_size: tuple[int, int]
    name: str                   # the file name the seed was combined with


def is_out_of_memory(error: BaseException) -> bool:
    """XLA reports device OOM as RESOURCE_EXHAUSTED (an XlaRuntimeError); the host as MemoryError."""
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


class Session:
    """The loaded models, a `PASDPipeline` per task and their compiled programs, and a lock: one job on the device
    at a time.

    Colorization samples with the scheduler beside the checkpoint (the official grayscale mode, as `pasd-sample
    --task colorize`), so it has a pipeline of its own, built on its first request. Only the pipeline in use keeps
    the weights on the device (switching task re-places them; compiled programs are kept)."""

    def __init__(self, loaded: Loaded, *, tiny: bool = False, classifier: Any = None,
                 max_megapixels: float = 16.0, output_dir: str | pathlib.Path | None = None,
                 pipeline: Any = None, colorize_scheduler: str | pathlib.Path | None = None,
                 make_pipeline: Callable[[Any], Any] | None = None):
        self.loaded = loaded
        self.tiny = tiny
        self._make_pipeline = make_pipeline or (lambda scheduler: PASDPipeline(
            loaded.models, loaded.params, scheduler, loaded.tokenizer_dir))
        self.pipe = pipeline if pipeline is not None else self._make_pipeline(loaded.scheduler_config)
        self.colorize_scheduler = colorize_scheduler
        self._pipes = {tasks.SR: self.pipe}
        self._active = self.pipe
        self.providers = {"none": NoneProvider()}
        if classifier is not None:
            self.providers["classification"] = classifier
        self.observations = ObservationCache()  # a classification runs once per distinct picture
        self.max_pixels = int(max_megapixels * 1e6)
        self.output_dir = pathlib.Path(output_dir or tempfile.mkdtemp(prefix="pasd-app-"))
        self._outputs: collections.deque[pathlib.Path] = collections.deque()
        self._lock = threading.Lock()

    def pipeline(self, task: str) -> Any:
        """The task's pipeline; the tiny models colorize with the base scheduler (they have no release folder)."""
        task = tasks.resolve(task)
        if task not in self._pipes:
            if self.colorize_scheduler is None and not self.tiny:
                raise AppError("colorization samples with the scheduler/ folder beside the checkpoint (the release "
                               "has pasd_light_color/scheduler next to checkpoint-180000), and this checkpoint has "
                               "none: start the app with a colorization checkpoint")
            self._pipes[task] = (self.pipe if self.colorize_scheduler is None
                                 else self._make_pipeline(self.colorize_scheduler))
        pipe = self._pipes[task]
        if pipe is not self._active and hasattr(self._active, "release"):
            self._active.release()  # one copy of the weights on the device
        self._active = pipe
        return pipe

    @classmethod
    def load(cls, ckpt: str | None = None, *, base: str | None = None, personalized: str | None = None,
             lora: str | None = None, lora_multiplier: float = 0.6, blending_alpha: float = 1.0,
             classifier_weights: str | None = None, categories_file: str | None = None, cache: Any = None,
             **kwargs) -> "Session":
        """Real weights (as `pasd-sample` loads them) when `ckpt` is given, else the embedded tiny models."""
        classifier = (classification_provider(classifier_weights, categories_file)
                      if classifier_weights else None)
        if ckpt is None:
            if base or personalized or lora:
                raise AppError("--base, --personalized and --lora apply to a PASD checkpoint: give --ckpt too")
            from pasd_jax.app.tiny import load_tiny

            return cls(load_tiny(), tiny=True, classifier=classifier, **kwargs)
        loaded = load_for_sampling(ckpt, base=base, personalized=personalized, blending_alpha=blending_alpha,
                                   lora=lora, lora_multiplier=lora_multiplier, cache=cache)
        try:
            colorize_scheduler = scheduler_beside_checkpoint(ckpt)
        except WeightFileError:
            colorize_scheduler = None  # an SR checkpoint: a colorize request says what is missing
        return cls(loaded, tiny=False, classifier=classifier, colorize_scheduler=colorize_scheduler, **kwargs)

    @property
    def defaults(self) -> Settings:
        """`pasd-sample`'s defaults, in fp32 on a CPU (bf16 there is emulated and slower) and, for the tiny
        models, at a small process size."""
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        return SAMPLE_DEFAULTS.replace(dtype=dtype, process_size=TINY_PROCESS_SIZE if self.tiny else 768)

    @property
    def prompt_sources(self) -> tuple[str, ...]:
        return tuple(self.providers)

    def prompt_fn(self, settings: Settings) -> Callable[[Image.Image, str], str]:
        """As `pasd-sample` builds it: the task's prompt rules, then (colorization) a given added prompt."""
        provider = self.providers.get(settings.high_level_info)
        if provider is None:
            raise AppError(f"prompt source {settings.high_level_info!r} is not available: start the app with "
                           "--classifier-weights (torchvision ResNet-50 .safetensors) for classification")
        fn = PromptFn(provider, settings.prompt, settings.added_prompt, settings.added_prompt_separator,
                      tasks.control_type(settings.task), self.observations)
        return tasks.with_added_prompt(settings.task, fn, settings.added_prompt, settings.added_prompt_separator)

    def run(self, path: str | pathlib.Path, settings: Settings, *, name: str | None = None,
            on_step: StepCallback | None = None) -> Result:
        """One request; waits for the device if another is running. `name` (default: the file's name) is what
        the seed is combined with, as `pasd-sample` combines it with the input's relative path."""
        path = pathlib.Path(path)
        name = name or path.name
        with self._lock:
            t0 = time.perf_counter()
            rgb = self._read(path, name)
            prepared, size = self._prepare(rgb, settings)
            prompt = self.prompt_fn(settings)(Image.fromarray(rgb, "RGB"), name)
            negative = settings.negative_prompt  # as given: the page fills in the task's default
            pipe = self.pipeline(settings.task)
            traces = pipe.trace_count
            h, w = prepared.lq.shape[:2]
            options, refusal = memory_options(pipe, settings.options(), (w, h), 1)  # as pasd-sample plans it
            if refusal is not None:
                raise AppError(refusal)
            try:
                out = pipe.sample(prepared.lq[None], [prompt], [negative], image_key(settings.seed, name)[None],
                                  options, on_step=on_step)[0]
            except Exception as e:  # noqa: BLE001 - device OOM comes as a runtime error; keep serving after it
                if is_out_of_memory(e):
                    raise AppError(f"the image is too large for this device's memory at {size[0]}x{size[1]} "
                                   "pixels: lower the upscale, the process size or the latent tile size") from e
                raise
            final = tasks.finish(settings.task, np.asarray(out), prepared, settings.color_fix)
            before = image_ops.pil_resize(prepared.original, (final.shape[1], final.shape[0]), Image.BICUBIC)
            png = self._write(final, name, settings)
            return Result(final, before, png, prompt, negative, settings.seed, time.perf_counter() - t0,
                          pipe.trace_count > traces, size, name)

    def _read(self, path: pathlib.Path, name: str) -> np.ndarray:
        try:
            return read_image(path).rgb
        except ImageReadError as e:  # the message names the server's temp path; the user knows the file name
            raise AppError(str(e).replace(str(path), name)) from e

    def _prepare(self, rgb: np.ndarray, settings: Settings) -> tuple[tasks.Prepared, tuple[int, int]]:
        h, w = rgb.shape[:2]
        try:
            size = image_ops.processed_size(w, h, settings.upscale, settings.process_size,
                                            tasks.control_type(settings.task))
        except ValueError as e:
            raise AppError(str(e)) from e
        if size[0] * size[1] > self.max_pixels:
            raise AppError(f"the processed image would be {size[0]}x{size[1]} pixels, over this server's limit of "
                           f"{self.max_pixels / 1e6:g} megapixels: lower the upscale or use a smaller image")
        return tasks.prepare(settings.task, rgb, settings.upscale, settings.process_size), size

    def _write(self, image: np.ndarray, name: str, settings: Settings) -> pathlib.Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        folder = pathlib.Path(tempfile.mkdtemp(dir=self.output_dir))
        self._outputs.append(folder)
        while len(self._outputs) > KEEP_OUTPUTS:
            shutil.rmtree(self._outputs.popleft(), ignore_errors=True)
        stem = pathlib.Path(name).stem or "image"
        png = folder / f"{stem}_pasd_{settings.task}_x{settings.upscale}_seed{settings.seed}.png"
        write_image(png, image)
        return png
