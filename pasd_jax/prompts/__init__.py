"""High-level information -> PASD's positive prompt (paper Table 4; official `test_pasd.py`; spec 4.3).

The sampler calls one function per run and then one callable per image::

    from pasd_jax.prompts import build_prompt_fn
    prompt_fn = build_prompt_fn("caption", prompt=args.prompt, added_prompt=args.added_prompt,
                                captioner=args.captioner, cache_dir=args.prompt_cache)
    text = prompt_fn(lq_image, "sub/0001.png")   # PIL image as opened (before any resize), path relative to input

`high_level_info` and what each needs:
- `"none"`: nothing. Text `""` or `"<prompt>, "`.
- `"classification"`: `classifier_weights`, torchvision's ResNet-50 IMAGENET1K_V2 state dict (`.safetensors`; `.pth`
  needs the torch extra), run in JAX with torchvision's preprocessing reproduced exactly; the 1000 class names from
  `categories_file`, else `imagenet_categories.json` beside the weights, else torchvision if installed.
  Top-1 softmax >= 0.1 gives `"<category>, "` / `"<prompt>, <category>, "`, otherwise `""`.
- `"detection"`: the `ultralytics` package and a local YOLO file (`detector_weights`, official `yolov8n.pt`).
  `"<count> <name>, "` per class, after `"<prompt>, "`.
- `"caption"`: `caption_model="coca"` (package `open_clip_torch`, `captioner` = local `coca_ViT-L-14` checkpoint file)
  or `"blip"` (torch + transformers, `captioner` = local BLIP folder); or `captions_file`, a JSON/CSV of captions
  made elsewhere (see `providers.load_captions_file`), which replaces the captioning model. "blurry"/"noisy" become
  "clear"/"clean"; CoCa joins `"<caption> <prompt>"`, BLIP `"<caption>, <prompt>"`, a captions file
  `"<caption>, <prompt>"` (its text otherwise verbatim).
Then `added_prompt` is appended **without a separator**, as the official code does (`separator=True` adds `", "`).
`control_type="grayscale"` follows the official colorization mode: the image is made gray before the provider runs,
"black and white" becomes "color", no added prompt; its negative prompt comes from `negative_prompt_for`.

Any other model plugs in through `make_prompt_fn(provider, ...)` with a provider whose model is a plain callable
(`ClassificationProvider(classify=...)`, `DetectionProvider(detect=...)`, `CaptionProvider(generate=...)`).

Errors, raised by `build_prompt_fn` before any sampling:
- `MissingDependencyError` (an `ImportError`): the optional package is absent; the message has the `pip install` line.
- `pasd_jax.convert.io.WeightFileError` (a `ValueError`): no weight path given, file missing, wrong tensors, or no
  category names; the message names the path/option and what belongs there. Nothing is ever downloaded.
- `CaptionsFileError` (a `ValueError`): unreadable captions file, or (per image) no entry for an image.

Model outputs are cached per (model + weights, image pixels), in memory and under `cache_dir` when given, so a second
sampling pass with other settings (prompt, seed, steps) reuses them; the model itself is then never loaded.
"""
from __future__ import annotations

import dataclasses
import os
from PIL import Image

from pasd_jax.prompts import rules
from pasd_jax.prompts.cache import ObservationCache, image_digest
from pasd_jax.prompts.providers import (CaptionProvider, CaptionsFileError, CaptionsFileProvider,
                                        ClassificationProvider, DetectionProvider, MissingDependencyError,
                                        NoneProvider, Provider, blip_provider, classification_provider,
                                        coca_provider, detection_provider, load_captions_file)
from pasd_jax.prompts.rules import (DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, GRAYSCALE_NEGATIVE_PROMPT,
                                    negative_prompt_for)

PathLike = str | os.PathLike
HIGH_LEVEL_INFO = ("none", "classification", "detection", "caption")

__all__ = [
    "HIGH_LEVEL_INFO", "DEFAULT_ADDED_PROMPT", "DEFAULT_NEGATIVE_PROMPT", "GRAYSCALE_NEGATIVE_PROMPT",
    "PromptFn", "build_prompt_fn", "make_provider", "make_prompt_fn", "negative_prompt_for",
    "Provider", "NoneProvider", "ClassificationProvider", "DetectionProvider", "CaptionProvider",
    "CaptionsFileProvider", "ObservationCache", "image_digest", "load_captions_file",
    "MissingDependencyError", "CaptionsFileError",
]


@dataclasses.dataclass
class PromptFn:
    """`(PIL image, relative path) -> positive prompt`, with the provider's outputs cached per image.

    `cache.hits` / `cache.misses` tell how many images reused a stored model output.
    """

    provider: Provider
    prompt: str = ""
    added_prompt: str = DEFAULT_ADDED_PROMPT
    separator: bool = False
    control_type: str = "realisr"
    cache: ObservationCache = dataclasses.field(default_factory=ObservationCache)

    def __post_init__(self):
        if self.control_type not in rules.CONTROL_TYPES:
            raise ValueError(f"control_type must be one of {rules.CONTROL_TYPES}, got {self.control_type!r}")

    def high_level_text(self, image: Image.Image, path: str) -> str:
        """The provider's text with the user prompt joined, before the added prompt."""
        image = image.convert("RGB")  # the official code opens every image as RGB
        if self.control_type == "grayscale":
            image = image.convert("L").convert("RGB")
        identity = self.provider.identity
        if identity is None:
            observation = self.provider.observe(image, path)
        else:
            observation = self.cache.get_or_compute(identity, image, lambda: self.provider.observe(image, path))
        return self.provider.render(observation, self.prompt)

    def __call__(self, image: Image.Image, path: str) -> str:
        return rules.final_prompt(self.high_level_text(image, path), self.added_prompt, self.control_type,
                                  self.separator)


def make_provider(high_level_info: str | None, *, captions_file: PathLike | None = None,
                  classifier_weights: PathLike | None = None, categories_file: PathLike | None = None,
                  detector_weights: PathLike | None = None, captioner: PathLike | None = None,
                  caption_model: str = "coca", device: str = "cpu") -> Provider:
    """The provider for a `--high-level-info` choice, its package and weight files checked now.

    `device` is where the torch-based detector/captioners run (host side, before sampling); the JAX classifier
    always uses JAX's default device.
    """
    mode = "none" if high_level_info is None else high_level_info
    if mode not in HIGH_LEVEL_INFO:
        raise ValueError(f"high_level_info must be one of {HIGH_LEVEL_INFO}, got {high_level_info!r}")
    if captions_file is not None and mode != "caption":
        raise ValueError(f"a captions file replaces the captioning model: it needs high_level_info='caption', "
                         f"not {mode!r}")
    if mode == "none":
        return NoneProvider()
    if mode == "classification":
        return classification_provider(classifier_weights, categories_file)
    if mode == "detection":
        return detection_provider(detector_weights)
    if captions_file is not None:
        return CaptionsFileProvider(load_captions_file(captions_file), source=str(captions_file))
    if caption_model == "coca":
        return coca_provider(captioner, device=device)
    if caption_model == "blip":
        return blip_provider(captioner, device=device)
    raise ValueError(f"caption_model must be 'coca' or 'blip', got {caption_model!r}")


def make_prompt_fn(provider: Provider, *, prompt: str = "", added_prompt: str = DEFAULT_ADDED_PROMPT,
                   separator: bool = False, control_type: str = "realisr",
                   cache_dir: PathLike | None = None) -> PromptFn:
    """Wrap any provider (including one with an injected model) into the per-image prompt function."""
    return PromptFn(provider, prompt, added_prompt, separator, control_type, ObservationCache(cache_dir))


def build_prompt_fn(high_level_info: str | None, *, prompt: str = "", added_prompt: str = DEFAULT_ADDED_PROMPT,
                    captions_file: PathLike | None = None, classifier_weights: PathLike | None = None,
                    categories_file: PathLike | None = None, detector_weights: PathLike | None = None,
                    captioner: PathLike | None = None, caption_model: str = "coca",
                    cache_dir: PathLike | None = None, separator: bool = False, control_type: str = "realisr",
                    device: str = "cpu") -> PromptFn:
    """The sampler's entry: `--high-level-info` and its files -> `(PIL image, relative path) -> positive prompt`.

    Fails now (not at the first image) on a missing package or weight file; see the package docstring.
    """
    provider = make_provider(high_level_info, captions_file=captions_file, classifier_weights=classifier_weights,
                             categories_file=categories_file, detector_weights=detector_weights,
                             captioner=captioner, caption_model=caption_model, device=device)
    return make_prompt_fn(provider, prompt=prompt, added_prompt=added_prompt, separator=separator,
                          control_type=control_type, cache_dir=cache_dir)
