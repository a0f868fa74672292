"""`--high-level-info detection`: object counts from an ultralytics YOLO model (the official PASD uses yolov8n)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from PIL import Image

from pasd_jax.prompts import rules
from pasd_jax.prompts.base import Observation
from pasd_jax.prompts.loading import LazyModel, PathLike, file_identity, require_file, require_package


@dataclasses.dataclass(frozen=True)
class DetectionProvider:
    """Object counts; `detect(image)` returns the class name of every box, in the detector's box order."""

    detect: Callable[[Image.Image], Sequence[str]]
    identity: str | None = None

    def observe(self, image: Image.Image, path: str) -> Observation:
        return [str(n) for n in self.detect(image)]

    def render(self, observation: Observation, prompt: str) -> str:
        return rules.detection_text(observation, prompt)


def detection_provider(weights_path: PathLike | None, imgsz: int = 640) -> DetectionProvider:
    """ultralytics YOLO (the official PASD uses `yolov8n.pt`) with its default thresholds, at `imgsz` 640."""
    require_package("ultralytics", "ultralytics", "--high-level-info detection")
    p = require_file(weights_path, "YOLO weight file (the official PASD uses yolov8n.pt, from its "
                     "pasd/annotator/ckpts folder)", "detector_weights / --detector-weights")

    def build() -> Callable[[Image.Image], list[str]]:
        from ultralytics import YOLO

        model = YOLO(str(p))

        def detect(image: Image.Image) -> list[str]:
            result = model.predict(image, imgsz=imgsz, verbose=False, save=False)[0]
            return rules.names_from_class_ids(result.boxes.cls.cpu().numpy(), result.names)

        return detect

    return DetectionProvider(detect=LazyModel(build), identity=f"detection/yolo/imgsz={imgsz}/{file_identity(p)}")
