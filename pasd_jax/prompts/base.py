"""The provider interface: (PIL image, relative path) -> the text PASD puts in front of the added prompt.

A provider has two halves:
- `observe(image, path)` runs the model and returns a small JSON value (top-1 class and score, detected class names,
  raw caption). This is the expensive part, the part that is cached (see `cache.py`);
- `render(observation, prompt)` applies the text rules of `rules.py`: cheap, never cached, so the user prompt and the
  threshold can change between sampling passes.
Each provider takes its model as a plain callable (`classify`, `detect`, `generate`), so tests drive the rules with
fake model outputs and any other model can be plugged in. One module per kind builds the real ones (see
`loading.py` for what they share).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from PIL import Image

from pasd_jax.prompts import rules

Observation = Any  # a JSON-serialisable value


class Provider(Protocol):
    """What the prompt builder needs from a provider. `identity` keys the cache; `None` means "do not cache"."""

    identity: str | None

    def observe(self, image: Image.Image, path: str) -> Observation: ...

    def render(self, observation: Observation, prompt: str) -> str: ...


def high_level_text(provider: Provider, image: Image.Image, path: str, prompt: str = "") -> str:
    """Run a provider without cache: the high-level text for one image (before the added prompt)."""
    return provider.render(provider.observe(image, path), prompt)


@dataclasses.dataclass(frozen=True)
class NoneProvider:
    """`--high-level-info none`: no model, `""` or `"<prompt>, "`."""

    identity: str | None = None

    def observe(self, image: Image.Image, path: str) -> Observation:
        return None

    def render(self, observation: Observation, prompt: str) -> str:
        return rules.none_text(prompt)
