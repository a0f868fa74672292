"""`--high-level-info` and its files -> the per-image prompt function the sampler calls (see the package docstring)."""
from __future__ import annotations

import dataclasses

from PIL import Image

from pasd_jax.prompts import rules
from pasd_jax.prompts.base import NoneProvider, Provider
from pasd_jax.prompts.cache import ObservationCache
from pasd_jax.prompts.caption import blip_provider, coca_provider
from pasd_jax.prompts.captions_file import CaptionsFileProvider, load_captions_file
from pasd_jax.prompts.classification import classification_provider
from pasd_jax.prompts.detection import detection_provider
from pasd_jax.prompts.loading import PathLike
from pasd_jax.prompts.rules import DEFAULT_ADDED_PROMPT

HIGH_LEVEL_INFO = ("none", "classification", "detection", "caption")


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
