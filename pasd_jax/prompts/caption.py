"""`--high-level-info caption` with a captioning model: CoCa (open_clip, the official choice) or BLIP (transformers).

Both run in torch on the host; a captions file made elsewhere (`captions_file.py`) replaces them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from PIL import Image

from pasd_jax.prompts import rules
from pasd_jax.prompts.base import Observation
from pasd_jax.prompts.loading import LazyModel, PathLike, file_identity, require_file, require_package


@dataclasses.dataclass(frozen=True)
class CaptionProvider:
    """Image captioning; `generate(image)` returns the raw decoded text (CoCa: with its special tokens)."""

    generate: Callable[[Image.Image], str]
    style: str = "coca"
    identity: str | None = None

    def __post_init__(self):
        if self.style not in rules.CAPTION_STYLES:
            raise ValueError(f"caption style must be one of {rules.CAPTION_STYLES}, got {self.style!r}")

    def observe(self, image: Image.Image, path: str) -> Observation:
        return str(self.generate(image))

    def render(self, observation: Observation, prompt: str) -> str:
        return rules.caption_text(rules.clean_caption(observation, self.style), prompt, self.style)


def coca_provider(weights_path: PathLike | None, model_name: str = "coca_ViT-L-14",
                  device: str = "cpu") -> CaptionProvider:
    """open_clip CoCa from a local checkpoint (official: `coca_ViT-L-14`, `mscoco_finetuned_laion2B-s13B-b90k`).

    `model.generate` with open_clip's defaults, as the official code. The official call sits under CUDA autocast
    (fp16 on a GPU); here it runs in float32 on `device`, so a rare caption may differ in a word.
    """
    require_package("open_clip", "open_clip_torch", "--high-level-info caption (CoCa)")
    p = require_file(weights_path, f"open_clip {model_name} checkpoint (mscoco_finetuned_laion2B-s13B-b90k, "
                     "open_clip_pytorch_model.bin or .safetensors)", "captioner / --captioner")

    def build() -> Callable[[Image.Image], str]:
        import open_clip
        import torch

        model, _, transform = open_clip.create_model_and_transforms(model_name=model_name, pretrained=str(p),
                                                                    device=device)
        model.eval()

        def generate(image: Image.Image) -> str:
            with torch.no_grad():
                tokens = model.generate(transform(image).unsqueeze(0).to(device))
            return open_clip.decode(tokens[0])

        return generate

    return CaptionProvider(generate=LazyModel(build), style="coca",
                           identity=f"caption/open_clip/{model_name}/{file_identity(p)}")


def blip_provider(model_dir: PathLike | None, device: str = "cpu") -> CaptionProvider:
    """transformers BLIP captioning from a local folder (e.g. blip-image-captioning-base), one caption per image.

    The official code uses LAVIS `blip_caption/base_coco`; transformers' BLIP is the maintained equivalent, so its
    captions may differ in wording. The BLIP join rules apply either way.
    """
    require_package("torch", "torch", "--high-level-info caption (BLIP)")
    p = require_file(model_dir, "BLIP captioning folder (transformers format: config.json, weights, processor "
                     "files)", "captioner / --captioner")

    def build() -> Callable[[Image.Image], str]:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        processor = BlipProcessor.from_pretrained(str(p), local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(str(p), local_files_only=True).to(device).eval()

        def generate(image: Image.Image) -> str:
            with torch.no_grad():
                out = model.generate(**processor(images=image, return_tensors="pt").to(device))
            return processor.decode(out[0], skip_special_tokens=True)

        return generate

    ident = file_identity(p) if p.is_file() else f"{p.resolve()}|" + "|".join(
        file_identity(f) for f in sorted(p.iterdir()) if f.is_file())
    return CaptionProvider(generate=LazyModel(build), style="blip", identity=f"caption/blip/{ident}")
