"""Matching predictions to ground truths (and LQ inputs) by relative path, then by file stem.

A key is the path relative to the folder without its suffix (`sub/0801.png` -> `sub/0801`). A prediction pairs
with the GT of the same key; failing that, with the only GT of the same stem (a flat folder of results against a
nested GT folder), then of the same stem without a resolution tag (`Canon_001_LR4` <-> `Canon_001_HR`). Hidden
files and folders are ignored; files with other suffixes are counted.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

from pasd_jax.evaluate.image_read import IMAGE_SUFFIXES

_SR_TAG = re.compile(r"[_-]?(hr|lr\d*|gt|lq|sr|x\d+)$", re.IGNORECASE)


@dataclasses.dataclass
class Folder:
    root: pathlib.Path
    files: dict[str, pathlib.Path]                 # key -> file
    ambiguous: dict[str, list[pathlib.Path]]       # key with several files (a.png and a.jpg)
    not_images: list[pathlib.Path]

    def rel(self, path: pathlib.Path) -> str:
        return path.relative_to(self.root).as_posix()


def scan(root: str | pathlib.Path) -> Folder:
    """All image files below `root`, by key."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    found: dict[str, list[pathlib.Path]] = {}
    not_images = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            not_images.append(path)
            continue
        found.setdefault(rel.with_suffix("").as_posix(), []).append(path)
    files = {k: v[0] for k, v in found.items() if len(v) == 1}
    return Folder(root, files, {k: v for k, v in found.items() if len(v) > 1}, not_images)


def _stem(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _untagged(key: str) -> str:
    return _SR_TAG.sub("", _stem(key)).lower()


def match(other: Folder, gt: Folder) -> tuple[dict[str, str], list[str]]:
    """({GT key: key in `other`}, keys of `other` with no GT). Tried in turn, each on what is still unpaired and
    only where the match is unique on both sides: the same key, the same stem, the same stem without a
    resolution tag (`_HR`, `_LR4`, `x4`, `_x1`, ...: DIV2K, RealSR and DRealSR name their pairs that way)."""
    pairs = {k: k for k in other.files if k in gt.files}
    for name_of in (_stem, _untagged):
        taken = set(pairs.values())
        free_gt: dict[str, list[str]] = {}
        for k in gt.files:
            if k not in pairs:
                free_gt.setdefault(name_of(k), []).append(k)
        free: dict[str, list[str]] = {}
        for k in other.files:
            if k not in taken:
                free.setdefault(name_of(k), []).append(k)
        for name, keys in free.items():
            if len(keys) == 1 and len(free_gt.get(name, ())) == 1:
                pairs[free_gt[name][0]] = keys[0]
    taken = set(pairs.values())
    return pairs, [k for k in other.files if k not in taken]
