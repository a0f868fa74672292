"""The four Flax modules of a PASD model, as one hashable value.

Training closes jitted steps over it and sampling keys its compiled programs on it; parameters always travel
separately, as {"unet", "controlnet", "vae", "text_encoder"} trees, so one set of modules serves any weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any

COMPONENTS = ("unet", "controlnet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class Models:
    """PASD UNet (with PACA), ControlNet (with the degradation-removal pyramid), VAE and CLIP text encoder."""
    unet: Any
    controlnet: Any
    vae: Any
    text_encoder: Any

    @property
    def variant(self) -> str:
        return self.unet.variant

    def clone(self, **module_kwargs: Any) -> "Models":
        """The same modules with changed attributes (e.g. `dtype=jnp.bfloat16`) on every one of them."""
        return Models(*(getattr(self, c).clone(**module_kwargs) for c in COMPONENTS))


def from_pairs(unet: tuple[Any, Any], controlnet: tuple[Any, Any], vae: tuple[Any, Any],
               text_encoder: tuple[Any, Any]) -> tuple[Models, dict]:
    """(module, params) pairs, as the loaders return them -> (Models, {component: params})."""
    pairs = (unet, controlnet, vae, text_encoder)
    return Models(*(m for m, _ in pairs)), {c: p for c, (_, p) in zip(COMPONENTS, pairs)}
