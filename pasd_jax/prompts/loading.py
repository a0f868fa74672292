"""What the real-model providers share: package and weight-file checks, cache identities, lazy model loading.

The torch based models run on the host, before sampling; they are loaded lazily, on the first image not already in
the cache, but their package and weight file are checked when the provider is built so a bad setup fails before any
sampling. Nothing is ever downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any, Callable

from PIL import Image

from pasd_jax.convert.io import WeightFileError
from pasd_jax.errors import MissingDependencyError

PathLike = str | os.PathLike


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


def require_file(path: PathLike | None, what: str, option: str) -> pathlib.Path:
    """The local weight path, or a `WeightFileError` naming `option` when it is not given or does not exist."""
    if path is None:
        raise WeightFileError(f"{what} is needed: pass its local path with {option}; nothing is downloaded")
    p = pathlib.Path(path)
    if not p.exists():
        raise WeightFileError(f"missing {what} {p} (given by {option}); nothing is downloaded: put the file there")
    return p


class LazyModel:
    """A callable whose model is built on its first call: a fully cached pass never loads the model."""

    def __init__(self, build: Callable[[], Callable[[Image.Image], Any]]):
        self._build = build
        self._fn: Callable[[Image.Image], Any] | None = None

    def __call__(self, image: Image.Image) -> Any:
        if self._fn is None:
            self._fn = self._build()
        return self._fn(image)
