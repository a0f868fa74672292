"""`--high-level-info classification`: torchvision's ResNet-50 (IMAGENET1K_V2) run in JAX, top-1 ImageNet class.

No torch needed for `.safetensors` weights; the class names come from a JSON file (or torchvision when installed).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from pasd_jax.convert.io import WeightFileError
from pasd_jax.prompts import rules
from pasd_jax.prompts.base import Observation
from pasd_jax.prompts.loading import LazyModel, PathLike, file_identity, require_file

CATEGORIES_FILE = "imagenet_categories.json"


@dataclasses.dataclass(frozen=True)
class ClassificationProvider:
    """Top-1 class of an image classifier; `classify(image)` returns the softmax probabilities over `categories`."""

    classify: Callable[[Image.Image], np.ndarray]
    categories: Sequence[str]
    identity: str | None = None
    threshold: float = rules.CLASSIFICATION_THRESHOLD

    def observe(self, image: Image.Image, path: str) -> Observation:
        probs = np.asarray(self.classify(image)).reshape(-1)
        if probs.shape[0] != len(self.categories):
            raise ValueError(f"classifier gave {probs.shape[0]} probabilities for {len(self.categories)} categories")
        index = int(np.argmax(probs))
        return {"index": index, "score": float(probs[index])}

    def render(self, observation: Observation, prompt: str) -> str:
        return rules.classification_text(self.categories[observation["index"]], observation["score"], prompt,
                                         self.threshold)


def load_categories(weights_path: PathLike | None = None, categories_file: PathLike | None = None,
                    num_classes: int = 1000) -> list[str]:
    """ImageNet class names: `categories_file`, else `imagenet_categories.json` beside the weights, else torchvision.

    The names must be torchvision's list (`ResNet50_Weights.IMAGENET1K_V2.meta["categories"]`, index = logit), since
    PASD writes exactly those names into the prompt.
    """
    if categories_file is not None and not pathlib.Path(categories_file).is_file():
        raise WeightFileError(f"missing category names file {categories_file} (a JSON list of the 1000 ImageNet "
                              f"names in torchvision's order)")
    candidates = [pathlib.Path(categories_file)] if categories_file is not None else []
    if weights_path is not None:
        candidates.append(pathlib.Path(weights_path).parent / CATEGORIES_FILE)
    for c in candidates:
        if c.is_file():
            try:
                with open(c, encoding="utf-8") as f:
                    names = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise WeightFileError(f"cannot parse category names {c}: {e}") from e
            break
    else:
        if importlib.util.find_spec("torchvision") is None:
            where = candidates[0] if candidates else pathlib.Path(CATEGORIES_FILE)
            raise WeightFileError(
                f"no ImageNet category names: put a JSON list of the 1000 names at {where} (torchvision's "
                f"ResNet50_Weights.IMAGENET1K_V2.meta['categories'], in order), pass categories_file, or install "
                f"torchvision")
        from torchvision.models import ResNet50_Weights

        names = list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)) or len(names) != num_classes:
        length = len(names) if hasattr(names, "__len__") else "?"
        raise WeightFileError(f"category names must be a JSON list of {num_classes} strings "
                              f"(got {type(names).__name__} of length {length})")
    return names


def make_jax_classifier(weights_path: PathLike) -> Callable[[Image.Image], np.ndarray]:
    """The torchvision ResNet-50 weights in JAX: PIL image -> softmax probabilities, jitted, batch of one.

    Runs on JAX's default device (the sampler's), in float32 at HIGHEST precision (no TF32), as the official fp32
    torchvision model computes on CPU.
    """
    import jax
    import jax.numpy as jnp

    from pasd_jax.convert.torchvision_resnet import load_torchvision_resnet50
    from pasd_jax.prompts.preprocess import imagenet_preprocess

    model, variables = load_torchvision_resnet50(weights_path, precision=jax.lax.Precision.HIGHEST)
    variables = jax.device_put(variables)

    @jax.jit
    def probs(variables: Any, pixel_values: jax.Array) -> jax.Array:
        return jax.nn.softmax(model.apply(variables, pixel_values).astype(jnp.float32), axis=-1)

    def classify(image: Image.Image) -> np.ndarray:
        return np.asarray(probs(variables, imagenet_preprocess(image)[None]))[0]

    return classify


def classification_provider(weights_path: PathLike | None, categories_file: PathLike | None = None,
                            threshold: float = rules.CLASSIFICATION_THRESHOLD) -> ClassificationProvider:
    """torchvision ResNet-50 weights (`.safetensors`, or `.pth` with the torch extra) run by the JAX port."""
    p = require_file(weights_path, "ResNet-50 weight file (torchvision IMAGENET1K_V2 state dict)",
                     "classifier_weights / --classifier-weights")
    categories = load_categories(p, categories_file)
    return ClassificationProvider(classify=LazyModel(lambda: make_jax_classifier(p)), categories=categories,
                                  identity=f"classification/torchvision-resnet50/{file_identity(p)}",
                                  threshold=threshold)
