"""High-level information providers: (PIL image, relative path) -> the text PASD puts in front of the added prompt.

A provider has two halves:
- `observe(image, path)` runs the model and returns a small JSON value (top-1 class and score, detected class names,
  raw caption). This is the expensive part, the part that is cached (see `cache.py`);
- `render(observation, prompt)` applies the text rules of `rules.py`: cheap, never cached, so the user prompt and the
  threshold can change between sampling passes.
Each provider takes its model as a plain callable (`classify`, `detect`, `generate`), so tests drive the rules with
fake model outputs and any other model can be plugged in. The `*_provider` factories below build the real ones:
ResNet-50 in JAX (no torch), YOLO through ultralytics, CoCa through open_clip, BLIP through transformers. The torch
based models run on the host, before sampling; they are loaded lazily, on the first image not already in the cache,
but their package and weight file are checked when the provider is built so a bad setup fails before any sampling.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import posixpath
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from pasd_jax.convert.io import WeightFileError
from pasd_jax.prompts import rules

PathLike = str | os.PathLike
Observation = Any  # a JSON-serialisable value


class MissingDependencyError(ImportError):
    """An optional package needed by the chosen `--high-level-info` is not installed."""


class CaptionsFileError(ValueError):
    """A `--captions` file is unreadable, malformed, or has no entry for an image."""


class Provider(Protocol):
    """What the prompt builder needs from a provider. `identity` keys the cache; `None` means "do not cache"."""

    identity: str | None

    def observe(self, image: Image.Image, path: str) -> Observation: ...

    def render(self, observation: Observation, prompt: str) -> str: ...


def high_level_text(provider: Provider, image: Image.Image, path: str, prompt: str = "") -> str:
    """Run a provider without cache: the high-level text for one image (before the added prompt)."""
    return provider.render(provider.observe(image, path), prompt)


# ---------------------------------------------------------------------------------------------------- providers


@dataclasses.dataclass(frozen=True)
class NoneProvider:
    """`--high-level-info none`: no model, `""` or `"<prompt>, "`."""

    identity: str | None = None

    def observe(self, image: Image.Image, path: str) -> Observation:
        return None

    def render(self, observation: Observation, prompt: str) -> str:
        return rules.none_text(prompt)


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


@dataclasses.dataclass(frozen=True)
class DetectionProvider:
    """Object counts; `detect(image)` returns the class name of every box, in the detector's box order."""

    detect: Callable[[Image.Image], Sequence[str]]
    identity: str | None = None

    def observe(self, image: Image.Image, path: str) -> Observation:
        return [str(n) for n in self.detect(image)]

    def render(self, observation: Observation, prompt: str) -> str:
        return rules.detection_text(observation, prompt)


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


@dataclasses.dataclass(frozen=True)
class CaptionsFileProvider:
    """Captions computed elsewhere, looked up by the image's relative path (then by file name, when unique)."""

    captions: Mapping[str, str]
    source: str = "<captions>"
    identity: str | None = None  # a dictionary lookup is not worth caching

    def observe(self, image: Image.Image, path: str) -> Observation:
        key = _normalise_key(path)
        if key in self.captions:
            return self.captions[key]
        base = posixpath.basename(key)
        matches = [k for k in self.captions if posixpath.basename(k) == base]
        if len(matches) == 1:
            return self.captions[matches[0]]
        if len(matches) > 1:
            raise CaptionsFileError(f"{self.source}: {path!r} is not listed and its file name matches several "
                                    f"entries ({', '.join(sorted(matches))}); list it by its relative path")
        raise CaptionsFileError(f"{self.source} has no caption for {path!r} (looked up as {key!r}, then {base!r}); "
                                f"add a row for it")

    def render(self, observation: Observation, prompt: str) -> str:
        return rules.captions_file_text(observation, prompt)


# ------------------------------------------------------------------------------------------------ captions files

_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")
_TEXT_COLUMNS = ("prompt", "caption", "text")


def _normalise_key(path: str) -> str:
    key = pathlib.PurePath(str(path)).as_posix()
    while key.startswith("./"):
        key = key[2:]
    return key


def load_captions_file(path: PathLike) -> dict[str, str]:
    """Read a `--captions` file into {relative image path: caption}.

    Accepted layouts:
      JSON: `{"img/a.png": "a caption", ...}` or `[{"path": "img/a.png", "prompt": "a caption"}, ...]`;
      CSV:  a header naming a path column (path, image, file, filename, image_path) and a text column
            (prompt, caption, text), or no header and two columns `path,caption`.
    Paths are relative to the input folder given to the sampler, with `/` separators.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CaptionsFileError(f"captions file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CaptionsFileError(f"cannot parse captions file {path}: {e}") from e
        if isinstance(data, dict):
            pairs = list(data.items())
        elif isinstance(data, list):
            pairs = []
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    raise CaptionsFileError(f"{path}: item {i} is not an object")
                pairs.append((_pick(row, _PATH_COLUMNS, path, i), _pick(row, _TEXT_COLUMNS, path, i)))
        else:
            raise CaptionsFileError(f"{path}: expected a JSON object or a list of objects")
    elif suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        pairs = _csv_pairs(rows, path)
    else:
        raise CaptionsFileError(f"captions file {path}: expected a .json or .csv file")
    out: dict[str, str] = {}
    for k, v in pairs:
        if not isinstance(k, str) or not isinstance(v, str):
            raise CaptionsFileError(f"{path}: entry {k!r} -> {v!r} must map a path string to a text string")
        key = _normalise_key(k)
        if key in out:
            raise CaptionsFileError(f"{path}: {key!r} is listed twice")
        out[key] = v
    return out


def _pick(row: Mapping[str, Any], names: Sequence[str], path: pathlib.Path, i: int) -> Any:
    for n in names:
        if n in row:
            return row[n]
    raise CaptionsFileError(f"{path}: item {i} has none of the keys {', '.join(names)}")


def _csv_pairs(rows: list[list[str]], path: pathlib.Path) -> list[tuple[str, str]]:
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if any(c in _PATH_COLUMNS for c in header):
        ip = next((header.index(c) for c in _PATH_COLUMNS if c in header))
        it = next((header.index(c) for c in _TEXT_COLUMNS if c in header), None)
        if it is None:
            raise CaptionsFileError(f"{path}: header {rows[0]} has no text column ({', '.join(_TEXT_COLUMNS)})")
        body, cols = rows[1:], (ip, it)
    else:
        body, cols = rows, (0, 1)
    pairs = []
    for n, r in enumerate(body):
        if len(r) <= max(cols):
            raise CaptionsFileError(f"{path}: row {n + 1} {r} has fewer than {max(cols) + 1} columns")
        pairs.append((r[cols[0]].strip(), r[cols[1]]))
    return pairs


# ------------------------------------------------------------------------------------------------ real models


def file_identity(path: PathLike) -> str:
    """Cheap identity of a weight file for cache keys: resolved path, size and modification time."""
    p = pathlib.Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def require_package(module: str, pip_name: str, purpose: str) -> None:
    """Raise `MissingDependencyError` with the install line when `module` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{purpose} needs the optional package {pip_name!r} (module {module!r}), which is not installed: "
            f"pip install {pip_name}. Alternatives that need nothing extra: --captions FILE with captions made "
            f"elsewhere, --high-level-info classification (JAX ResNet-50) or --high-level-info none.")


def _require_file(path: PathLike | None, what: str, option: str) -> pathlib.Path:
    if path is None:
        raise WeightFileError(f"{what} is needed: pass its local path with {option}; nothing is downloaded")
    p = pathlib.Path(path)
    if not p.exists():
        raise WeightFileError(f"missing {what} {p} (given by {option}); nothing is downloaded: put the file there")
    return p


class _Lazy:
    """A callable whose model is built on its first call: a fully cached pass never loads the model."""

    def __init__(self, build: Callable[[], Callable[[Image.Image], Any]]):
        self._build = build
        self._fn: Callable[[Image.Image], Any] | None = None

    def __call__(self, image: Image.Image) -> Any:
        if self._fn is None:
            self._fn = self._build()
        return self._fn(image)


CATEGORIES_FILE = "imagenet_categories.json"


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
    p = _require_file(weights_path, "ResNet-50 weight file (torchvision IMAGENET1K_V2 state dict)",
                      "classifier_weights / --classifier-weights")
    categories = load_categories(p, categories_file)
    return ClassificationProvider(classify=_Lazy(lambda: make_jax_classifier(p)), categories=categories,
                                  identity=f"classification/torchvision-resnet50/{file_identity(p)}",
                                  threshold=threshold)


def detection_provider(weights_path: PathLike | None, imgsz: int = 640) -> DetectionProvider:
    """ultralytics YOLO (the official PASD uses `yolov8n.pt`) with its default thresholds, at `imgsz` 640."""
    require_package("ultralytics", "ultralytics", "--high-level-info detection")
    p = _require_file(weights_path, "YOLO weight file (the official PASD uses yolov8n.pt, from its "
                      "pasd/annotator/ckpts folder)", "detector_weights / --detector-weights")

    def build() -> Callable[[Image.Image], list[str]]:
        from ultralytics import YOLO

        model = YOLO(str(p))

        def detect(image: Image.Image) -> list[str]:
            result = model.predict(image, imgsz=imgsz, verbose=False, save=False)[0]
            return rules.names_from_class_ids(result.boxes.cls.cpu().numpy(), result.names)

        return detect

    return DetectionProvider(detect=_Lazy(build), identity=f"detection/yolo/imgsz={imgsz}/{file_identity(p)}")


def coca_provider(weights_path: PathLike | None, model_name: str = "coca_ViT-L-14",
                  device: str = "cpu") -> CaptionProvider:
    """open_clip CoCa from a local checkpoint (official: `coca_ViT-L-14`, `mscoco_finetuned_laion2B-s13B-b90k`).

    `model.generate` with open_clip's defaults, as the official code. The official call sits under CUDA autocast
    (fp16 on a GPU); here it runs in float32 on `device`, so a rare caption may differ in a word.
    """
    require_package("open_clip", "open_clip_torch", "--high-level-info caption (CoCa)")
    p = _require_file(weights_path, f"open_clip {model_name} checkpoint (mscoco_finetuned_laion2B-s13B-b90k, "
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

    return CaptionProvider(generate=_Lazy(build), style="coca",
                           identity=f"caption/open_clip/{model_name}/{file_identity(p)}")


def blip_provider(model_dir: PathLike | None, device: str = "cpu") -> CaptionProvider:
    """transformers BLIP captioning from a local folder (e.g. blip-image-captioning-base), one caption per image.

    The official code uses LAVIS `blip_caption/base_coco`; transformers' BLIP is the maintained equivalent, so its
    captions may differ in wording. The BLIP join rules apply either way.
    """
    require_package("torch", "torch", "--high-level-info caption (BLIP)")
    p = _require_file(model_dir, "BLIP captioning folder (transformers format: config.json, weights, processor "
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
    return CaptionProvider(generate=_Lazy(build), style="blip", identity=f"caption/blip/{ident}")
