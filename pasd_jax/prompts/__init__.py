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
  made elsewhere (see `captions_file.load_captions_file`), which replaces the captioning model. "blurry"/"noisy" become
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

Modules: `build` (the above), `base` (the provider interface, `none`), `classification`, `detection`,
`caption`, `captions_file` (one per kind), `loading` (package/weight checks shared by the real models), `rules`
(all prompt text), `cache`, `preprocess` (torchvision's ImageNet preprocessing).

Model outputs are cached per (model + weights, image pixels), in memory and under `cache_dir` when given, so a second
sampling pass with other settings (prompt, seed, steps) reuses them; the model itself is then never loaded.
"""
from __future__ import annotations

from pasd_jax.prompts import rules
from pasd_jax.prompts.base import NoneProvider, Provider
from pasd_jax.prompts.build import HIGH_LEVEL_INFO, PromptFn, build_prompt_fn, make_prompt_fn, make_provider
from pasd_jax.prompts.cache import ObservationCache, image_digest
from pasd_jax.prompts.caption import CaptionProvider, blip_provider, coca_provider
from pasd_jax.prompts.captions_file import CaptionsFileError, CaptionsFileProvider, load_captions_file
from pasd_jax.prompts.classification import ClassificationProvider, classification_provider
from pasd_jax.prompts.detection import DetectionProvider, detection_provider
from pasd_jax.prompts.loading import MissingDependencyError
from pasd_jax.prompts.rules import (DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, GRAYSCALE_NEGATIVE_PROMPT,
                                    negative_prompt_for)

__all__ = [
    "HIGH_LEVEL_INFO", "DEFAULT_ADDED_PROMPT", "DEFAULT_NEGATIVE_PROMPT", "GRAYSCALE_NEGATIVE_PROMPT",
    "PromptFn", "build_prompt_fn", "make_provider", "make_prompt_fn", "negative_prompt_for",
    "Provider", "NoneProvider", "ClassificationProvider", "DetectionProvider", "CaptionProvider",
    "CaptionsFileProvider", "ObservationCache", "image_digest", "load_captions_file",
    "MissingDependencyError", "CaptionsFileError",
]
