"""Random-access training-image sources. Each is a sequence of records {"image", "caption", "key"}.

`image` is the encoded file (bytes, decoded later in the loader's workers, so decoding runs in parallel and
bad files are caught per record) or, for in-memory sources, an HxWxC uint8 array. Sources hold no open
files when pickled to Grain's worker processes; handles are reopened lazily in each process.

- FolderSource: a folder tree of png/jpg/jpeg/webp, captions from a same-name .txt (first line), as PASD's
  local dataset.
- TarShardSource: webdataset-style tar shards (`<key>.png|jpg|...` + `<key>.txt`), the layout of PASD's
  released training set; one pass over each shard builds an offset index, cached beside it (or in
  `index_dir`) and checked against the shard's size and mtime.
- TfdsSource: a TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow at read time).
- ProceduralSource: textured synthetic images with matching captions, for demos and tests (no files).
- Mixture: several sources with sampling weights (the loader mixes them after shuffling each).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from pasd_jax.errors import DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
CAPTION_EXTS = ("txt", "text", "caption")

Record = dict[str, Any]


def _first_line(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text.splitlines()[0].strip() if text else ""


class FolderSource:
    """All images under `root` (recursive, sorted by relative path); caption = first line of `<stem>.txt`.

    A missing caption file gives an empty caption (PASD would crash); unreadable files surface as
    read errors at load time and are skipped and counted by the loader.
    """

    def __init__(self, root: str | os.PathLike, exts: Sequence[str] = IMAGE_EXTS):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        ok = {"." + e.lower() for e in exts}
        self.paths = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                            if p.suffix.lower() in ok and p.is_file())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Record:
        rel = self.paths[i]
        path = self.root / rel
        caption = ""
        txt = path.with_suffix(".txt")
        if txt.is_file():
            caption = _first_line(txt.read_bytes())
        return {"image": path.read_bytes(), "caption": caption, "key": rel}

    def record_name(self, i: int) -> str:
        return str(self.root / self.paths[i])

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self)} images)"


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest, lower case."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def build_tar_index(path: str) -> dict[str, Any]:
    """One pass over an uncompressed tar: for each key with an image, (offset, size) of image and caption."""
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            s = samples.setdefault(key, {})
            if ext in IMAGE_EXTS and "img" not in s:
                s["img"] = (m.offset_data, m.size)
            elif ext in CAPTION_EXTS and "txt" not in s:
                s["txt"] = (m.offset_data, m.size)
    keys = [k for k in samples if "img" in samples[k]]
    st = os.stat(path)
    return {
        "version": 1, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "keys": keys,
        "img": [samples[k]["img"] for k in keys],
        "txt": [samples[k].get("txt", (-1, 0)) for k in keys],
        "no_image": len(samples) - len(keys),
    }


def load_tar_index(path: str, index_dir: str | None = None) -> dict[str, Any]:
    """The cached index of one shard, rebuilt when missing or stale (size/mtime changed)."""
    cache = pathlib.Path(index_dir or os.path.dirname(os.path.abspath(path))) / (os.path.basename(path) + ".index.json")
    st = os.stat(path)
    try:
        idx = json.loads(cache.read_text())
        if idx.get("version") == 1 and idx["size"] == st.st_size and idx["mtime_ns"] == st.st_mtime_ns:
            return idx
    except (OSError, ValueError, KeyError):
        pass
    idx = build_tar_index(path)
    try:  # atomic write; a read-only shard folder just means no cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(idx, separators=(",", ":")))
        os.replace(tmp, cache)
    except OSError:
        pass
    return idx


class TarShardSource:
    """Random access into uncompressed webdataset-style tar shards through cached offset indexes."""

    def __init__(self, shards: Sequence[str | os.PathLike] | str, index_dir: str | None = None):
        if isinstance(shards, (str, os.PathLike)):
            pattern = str(shards)
            shards = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise FileNotFoundError("no tar shards given (or the pattern matched none)")
        for s in self.shards:
            if s.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
                raise DataError(f"{s}: compressed tars have no random access; use plain .tar shards")
        shard_ids, keys, img, txt = [], [], [], []
        self.no_image = 0
        for i, s in enumerate(self.shards):
            idx = load_tar_index(s, index_dir)
            shard_ids.append(np.full(len(idx["keys"]), i, np.int32))
            keys.extend(idx["keys"])
            img.extend(idx["img"])
            txt.extend(idx["txt"])
            self.no_image += idx["no_image"]
        self._shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._img = np.asarray(img, np.int64).reshape(-1, 2)
        self._txt = np.asarray(txt, np.int64).reshape(-1, 2)
        self._keys = keys
        self._fds: dict[int, int] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)  # thread-safe positional read
        if len(data) != size:
            raise OSError(f"{self.shards[shard]}: short read at {offset} ({len(data)} of {size} bytes)")
        return data

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> Record:
        shard = int(self._shard[i])
        off, size = (int(v) for v in self._img[i])
        toff, tsize = (int(v) for v in self._txt[i])
        caption = _first_line(self._read(shard, toff, tsize)) if toff >= 0 else ""
        return {"image": self._read(shard, off, size), "caption": caption, "key": self._keys[i]}

    def record_name(self, i: int) -> str:
        return f"{self.shards[int(self._shard[i])]}:{self._keys[i]}"

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.shards)} shards, {len(self)} samples)"


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, by registered `name` or by its prepared `builder_dir`.

    Images are read undecoded (SkipDecoding) and decoded in the loader like files. Needs the `tfds` extra
    (tensorflow-datasets, array_record), not TensorFlow.
    """

    def __init__(self, name: str | None = None, *, split: str = "train", data_dir: str | None = None,
                 builder_dir: str | None = None, image_key: str = "image", caption_key: str | None = "caption"):
        import tensorflow_datasets as tfds

        if (name is None) == (builder_dir is None):
            raise DataError("give exactly one of name= or builder_dir=")
        decoders = {image_key: tfds.decode.SkipDecoding()}
        if builder_dir is not None:
            builder = tfds.builder_from_directory(builder_dir)
            self._ds = builder.as_data_source(split=split, decoders=decoders)
        else:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders, download=False)
        self.image_key, self.caption_key = image_key, caption_key
        self.desc = f"{name or builder_dir}[{split}]"

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> Record:
        ex = self._ds[i]
        cap = ex.get(self.caption_key, b"") if self.caption_key else b""
        cap = _first_line(cap) if isinstance(cap, bytes) else str(cap).strip()
        img = ex[self.image_key]
        return {"image": bytes(img) if isinstance(img, (bytes, bytearray, memoryview)) else img,
                "caption": cap, "key": f"{self.desc}#{i}"}

    def record_name(self, i: int) -> str:
        return f"{self.desc}#{i}"

    def __repr__(self) -> str:
        return f"TfdsSource({self.desc}, {len(self)} records)"


_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
            "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}


class ProceduralSource:
    """`n` deterministic synthetic RGB images (gradients, shapes, stripes, noise) with captions naming them.

    Record i depends only on (seed, i); nothing is read from disk. Used by the offline demo and by tests.
    """

    def __init__(self, n: int, size: int = 512, seed: int = 0):
        self.n, self.size, self.seed = int(n), int(size), int(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        names = list(_COLOURS)
        c1, c2, c3 = (names[j] for j in rng.choice(len(names), 3, replace=False))
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        ang = rng.uniform(0, 2 * np.pi)
        t = np.clip((np.cos(ang) * xx + np.sin(ang) * yy + 1) / 2, 0, 1)[..., None]
        img = (1 - t) * np.array(_COLOURS[c1], np.float32) + t * np.array(_COLOURS[c2], np.float32)
        parts = [f"a {c1} to {c2} gradient"]
        period = rng.uniform(6, 40)
        if rng.random() < 0.5:
            phase = np.sin(2 * np.pi * (xx * np.cos(ang + 1) + yy * np.sin(ang + 1)) * s / period)
            img *= (0.8 + 0.2 * (phase > 0))[..., None]
            parts.append("with stripes")
        shape = ["circle", "square"][int(rng.integers(2))]
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.25)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if shape == "circle" else (
            (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r))
        img[mask] = np.array(_COLOURS[c3], np.float32)
        parts.append(f"and a {c3} {shape}")
        img += rng.normal(0, rng.uniform(2, 12), img.shape).astype(np.float32)  # texture
        return {"image": np.clip(img, 0, 255).astype(np.uint8), "caption": " ".join(parts), "key": f"procedural/{i}"}

    def __repr__(self) -> str:
        return f"ProceduralSource(n={self.n}, size={self.size}, seed={self.seed})"


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Sources sampled in proportion to `weights` (each shuffled and repeated on its own, then mixed)."""

    sources: tuple[Any, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.sources) != len(self.weights) or not self.sources:
            raise DataError("Mixture needs one weight per source and at least one source")
        if any(w <= 0 for w in self.weights):
            raise DataError(f"Mixture weights must be positive, got {self.weights}")
