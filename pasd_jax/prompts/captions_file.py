"""`--captions FILE`: captions made elsewhere (JSON or CSV), looked up per image; replaces the captioning model."""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import posixpath
from typing import Any, Mapping, Sequence

from PIL import Image

from pasd_jax.prompts import rules
from pasd_jax.prompts.base import Observation
from pasd_jax.prompts.loading import PathLike

_PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")
_TEXT_COLUMNS = ("prompt", "caption", "text")


class CaptionsFileError(ValueError):
    """A `--captions` file is unreadable, malformed, or has no entry for an image."""


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
