"""Per-image cache of high-level model outputs (class, detections, caption), in memory and optionally on disk.

Running CoCa, YOLO or ResNet-50 costs far more than building a prompt, and their outputs do not depend on any
sampling setting. So the cache stores the raw model output (a small JSON value), keyed by the provider's identity
(model + weights + options) and a hash of the decoded image; prompt rules are applied after the lookup, and a second
sampling pass with another `--prompt`, `--added-prompt`, seed or step count reuses every entry.

Entries are single JSON files written atomically, so concurrent runs sharing a folder at worst compute twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable

from PIL import Image

CACHE_FORMAT = 1  # bump when the stored value layout changes


def image_digest(image: Image.Image) -> str:
    """sha256 of the decoded pixels (mode, size, bytes): the same picture re-saved or renamed still hits."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ObservationCache:
    """Memoises `compute(image)` under `(identity, image digest)`; `cache_dir=None` keeps it in memory only.

    `hits` and `misses` count lookups, so callers and tests can see that a model ran once per image.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0

    def _key(self, identity: str, image: Image.Image) -> str:
        return hashlib.sha256(f"{CACHE_FORMAT}\0{identity}\0{image_digest(image)}".encode()).hexdigest()

    def _file(self, key: str) -> pathlib.Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def get_or_compute(self, identity: str, image: Image.Image, compute: Callable[[], Any]) -> Any:
        """The cached value for this provider and image, computing and storing it on a miss."""
        key = self._key(identity, image)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        if self.cache_dir is not None:
            path = self._file(key)
            try:
                with open(path) as f:
                    entry = json.load(f)
                if entry.get("identity") == identity:
                    self.hits += 1
                    self._memory[key] = entry["value"]
                    return entry["value"]
            except (OSError, json.JSONDecodeError, KeyError, AttributeError):
                pass  # absent or unreadable entry: recompute and overwrite
        self.misses += 1
        value = compute()
        self._memory[key] = value
        if self.cache_dir is not None:
            path = self._file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump({"identity": identity, "value": value}, f)
            os.replace(tmp, path)
        return value
