"""A cache of converted weights: Flax-layout safetensors keyed by the source files and the converter version.

Converting a PyTorch checkpoint (strict key mapping, tracing the model for its parameter shapes, transposing every
kernel, reading a pickled `.ckpt` through torch) is repeated work on every run of `sample.py` or `train.py`. An entry
stores the converted tree in our layout plus what is needed to rebuild the module, so a hit skips all of that.

Trust rules: the key covers each source file's resolved path, size and mtime, the converter version and what was asked
(component, parameter dtype, configs); the entry's metadata must repeat that key; a SHA-256 over every tensor must
match. Anything else (truncated, edited, foreign or old-format file) is deleted and converted again, never used.
Writes go to a uniquely named temp file that is renamed into place, so concurrent writers (several hosts sharing a
home directory) never leave a torn entry.

Location: `$PASD_JAX_CACHE` if set (`off`, `0`, `false` or `none` turns caching off), else `$XDG_CACHE_HOME/pasd_jax`
or `~/.cache/pasd_jax`. The same file format holds imported checkpoints (`pasd-convert import`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from pasd_jax.convert import progress
from pasd_jax.convert.io import PathLike, WeightFileError, map_safetensors, release_pages, write_safetensors

log = logging.getLogger(__name__)

# Bump whenever a conversion could produce different tensors or metadata for the same sources.
CONVERTER_VERSION = "1"
FORMAT = "pasd_jax.flax_params"
FORMAT_VERSION = "1"
ENV = "PASD_JAX_CACHE"
_OFF = {"off", "0", "false", "none", "no"}
_SEP = "/"


class CacheEntryError(WeightFileError):
    """A Flax-layout weight file that is damaged, of another format, or does not belong to the requested key."""


# ------------------------------------------------------------------------------------------ Flax-layout files

def _checksum(flat: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _flat(params: Any) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in flatten_dict(params).items():
        if any(_SEP in p for p in path):
            raise ValueError(f"parameter path {path} contains {_SEP!r}")
        out[_SEP.join(path)] = np.asarray(leaf)
    return out


def _atomic_save(flat: Mapping[str, np.ndarray], path: pathlib.Path, metadata: Mapping[str, str]) -> None:
    # streamed tensor by tensor: the tree is never held a second time as one serialised buffer
    write_safetensors(flat, path, metadata)


def save_flax_params(path: PathLike, params: Any, meta: Mapping[str, Any],
                     extra: Mapping[str, str] | None = None) -> pathlib.Path:
    """Write a Flax param tree (any array leaves) with JSON `meta` and a checksum; atomic."""
    path = pathlib.Path(path)
    flat = _flat(params)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": json.dumps(meta),
                "checksum": _checksum(flat), **(extra or {})}
    _atomic_save(flat, path, metadata)
    return path


def load_flax_params(path: PathLike) -> tuple[dict, dict[str, Any], dict[str, str]]:
    """(numpy param tree, meta, raw metadata) of a file written by `save_flax_params`; verifies the checksum.

    The leaves are read-only views of a memory map of the file (no host copy; see `io.map_safetensors`)."""
    path = pathlib.Path(path)
    try:
        mapped = map_safetensors(path)
        metadata = mapped.metadata
        flat = dict(mapped)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad entry
        raise CacheEntryError(f"{path}: unreadable Flax weight file ({e})") from e
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CacheEntryError(f"{path}: not a pasd-jax Flax weight file of format {FORMAT} v{FORMAT_VERSION} "
                              f"(found {metadata.get('format')!r} v{metadata.get('format_version')!r})")
    if _checksum(flat) != metadata.get("checksum"):
        raise CacheEntryError(f"{path}: checksum mismatch, the file was modified or damaged")
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CacheEntryError(f"{path}: metadata has no readable 'meta' entry") from e
    for v in flat.values():  # read once by the checksum: out of this process's resident memory until used
        release_pages(v)
    tree = unflatten_dict({tuple(k.split(_SEP)): v for k, v in flat.items()})
    return tree, meta, metadata


# ------------------------------------------------------------------------------------------ the cache

def file_fingerprint(path: PathLike) -> dict[str, Any]:
    """What identifies a source file's content cheaply: resolved path, size and mtime (ns)."""
    p = pathlib.Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


_DIGESTS: dict[tuple, str] = {}


def content_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes (remembered per resolved path, size and mtime within the process)."""
    fp = file_fingerprint(path)
    memo = (fp["path"], fp["size"], fp["mtime_ns"])
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(fp["path"], "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def config_digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs, shapes) for cache tags."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class CacheStats:
    """Counters a test (or a log line) reads: `conversions` counts calls of the converter."""
    hits: int = 0
    conversions: int = 0
    rebuilt: int = 0  # entries that existed but were rejected and converted again


def default_cache_dir() -> pathlib.Path | None:
    """`$PASD_JAX_CACHE`, else `$XDG_CACHE_HOME/pasd_jax` or `~/.cache/pasd_jax`; None if caching is off."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        if env.strip().lower() in _OFF:
            return None
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "pasd_jax"


class ConversionCache:
    """Converted-weights cache under `root`: `load_or_convert(sources, tag, convert)`."""

    def __init__(self, root: PathLike):
        self.root = pathlib.Path(root).expanduser()
        self.stats = CacheStats()
        self.hooks: list[Callable[[str], None]] = []  # called with the entry key on every conversion

    def __repr__(self) -> str:
        return f"ConversionCache({str(self.root)!r})"

    def key(self, sources: Sequence[PathLike], tag: Mapping[str, Any]) -> str:
        fp = [file_fingerprint(s) for s in sources]
        return hashlib.sha256(json.dumps({"converter": CONVERTER_VERSION, "sources": fp, "tag": tag},
                                         sort_keys=True, default=str).encode()).hexdigest()[:40]

    def _family(self, sources: Sequence[PathLike], tag: Mapping[str, Any]) -> str:
        """Entries for the same source paths and tag share this prefix, so a stale one is replaced, not kept."""
        paths = [str(pathlib.Path(s).resolve()) for s in sources]
        return hashlib.sha256(json.dumps([paths, tag], sort_keys=True, default=str).encode()).hexdigest()[:12]

    def path_for(self, sources: Sequence[PathLike], tag: Mapping[str, Any]) -> pathlib.Path:
        return self.root / f"{self._family(sources, tag)}-{self.key(sources, tag)}.safetensors"

    def lookup(self, sources: Sequence[PathLike], tag: Mapping[str, Any]) -> tuple[dict, dict] | None:
        """(params, meta) of a valid entry, else None; a bad entry is deleted (and counted in `rebuilt`)."""
        return self._lookup_at(self.path_for(sources, tag), self.key(sources, tag))

    def _lookup_at(self, path: pathlib.Path, key: str) -> tuple[dict, dict] | None:
        if not path.is_file():
            return None
        try:
            with progress.stage(str(path.name), "reading and checking the converted weights", path.stat().st_size,
                                "verify"):
                params, meta, raw = load_flax_params(path)
            if raw.get("cache_key") != key or raw.get("converter") != CONVERTER_VERSION:
                raise CacheEntryError(f"{path}: entry belongs to another key or converter version")
        except CacheEntryError as e:
            log.warning("conversion cache: discarding bad entry (%s); converting again", e)
            self.stats.rebuilt += 1
            path.unlink(missing_ok=True)
            return None
        self.stats.hits += 1
        return params, meta

    def store(self, sources: Sequence[PathLike], tag: Mapping[str, Any], params: Any,
              meta: Mapping[str, Any]) -> pathlib.Path | None:
        """Write an entry (and drop older entries of the same sources); a failed write only logs a warning."""
        return self._store_at(self.path_for(sources, tag), self.key(sources, tag), params, meta,
                              json.dumps([str(s) for s in sources]))

    def _store_at(self, path: pathlib.Path, key: str, params: Any, meta: Mapping[str, Any],
                  sources_note: str) -> pathlib.Path | None:
        try:
            nbytes = sum(int(np.asarray(x).nbytes) for x in flatten_dict(params).values())
            with progress.stage(str(self.root), f"writing the converted weights {path.name}", nbytes, "write"):
                save_flax_params(path, params, meta, extra={"cache_key": key, "converter": CONVERTER_VERSION,
                                                            "sources": sources_note})
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written must not stop a load
            log.warning("conversion cache: cannot write %s (%s); continuing without caching", path, e)
            return None
        family = path.name.split("-")[0]
        for old in self.root.glob(f"{family}-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def load_or_convert(self, sources: Sequence[PathLike], tag: Mapping[str, Any],
                        convert: Callable[[], tuple[Any, Mapping[str, Any]]]) -> tuple[dict, dict]:
        """The cached (params, meta) for these sources and tag, or `convert()`'s result, stored for next time."""
        hit = self.lookup(sources, tag)
        if hit is not None:
            return hit
        params, meta = self.note_conversion(sources, tag, convert)
        return self._mapped_after_store(self.store(sources, tag, params, meta), params, meta)

    @staticmethod
    def _mapped_after_store(path: pathlib.Path | None, params: Any, meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """The entry just written, read back as memory-mapped views (and checked), so the converted in-memory copy
        is freed instead of staying resident for the caller's life; the converted copy if the write failed."""
        if path is not None:
            try:
                mapped, _, _ = load_flax_params(path)
                return mapped, dict(meta)
            except CacheEntryError as e:
                log.warning("conversion cache: the entry just written does not read back (%s)", e)
        return params, dict(meta)

    def note_conversion(self, sources: Sequence[PathLike], tag: Mapping[str, Any],
                        convert: Callable[[], Any]) -> Any:
        return self._note(self.key(sources, tag), convert)

    def _note(self, key: str, convert: Callable[[], Any]) -> Any:
        self.stats.conversions += 1
        for hook in self.hooks:
            hook(key)
        return convert()

    # -------------------------------------------------------------------------------- content-keyed entries
    # Fused LoRA weights are keyed by what went in (the base's identity, the LoRA files' content hashes and the
    # multipliers), not by file fingerprints: a renamed or copied LoRA still hits. `family` (the base and the LoRA
    # paths) groups entries so that a new multiplier or an edited LoRA replaces the old entry instead of piling up.

    def content_key(self, key: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps({"converter": CONVERTER_VERSION, "key": key}, sort_keys=True,
                                         default=str).encode()).hexdigest()[:40]

    def content_path(self, family: Mapping[str, Any], key: Mapping[str, Any]) -> pathlib.Path:
        fam = hashlib.sha256(json.dumps(family, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.root / f"{fam}-{self.content_key(key)}.safetensors"

    def load_or_compute(self, family: Mapping[str, Any], key: Mapping[str, Any],
                        compute: Callable[[], tuple[Any, Mapping[str, Any]]]) -> tuple[dict, dict]:
        """The entry for `key` (JSON-able, content-derived), or `compute()`'s result, stored for next time."""
        path, digest = self.content_path(family, key), self.content_key(key)
        for candidate in [path, *sorted(self.root.glob(f"*-{digest}.safetensors"))]:
            hit = self._lookup_at(candidate, digest)  # the same inputs under other paths (a copied LoRA) hit too
            if hit is not None:
                return hit
        params, meta = self._note(digest, compute)
        written = self._store_at(path, digest, params, meta, json.dumps(family, sort_keys=True, default=str))
        return self._mapped_after_store(written, params, meta)

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        n = 0
        for p in self.root.glob("*.safetensors"):
            p.unlink(missing_ok=True)
            n += 1
        return n


_DEFAULT: dict[pathlib.Path, ConversionCache] = {}


def resolve_cache(cache: "ConversionCache | PathLike | bool | None" = None) -> ConversionCache | None:
    """None -> the default cache (or None if `$PASD_JAX_CACHE` is off); False -> off; a path -> a cache there."""
    if cache is False:
        return None
    if isinstance(cache, ConversionCache):
        return cache
    if cache is None or cache is True:
        root = default_cache_dir()
        if root is None:
            return None
        return _DEFAULT.setdefault(root, ConversionCache(root))
    return ConversionCache(cache)


def cached(cache: ConversionCache | None, sources: Iterable[PathLike], tag: Mapping[str, Any],
           convert: Callable[[], tuple[Any, Mapping[str, Any]]]) -> tuple[Any, dict]:
    """`convert()` through `cache` when there is one (tag values must be JSON-able)."""
    if cache is None:
        params, meta = convert()
        return params, dict(meta)
    return cache.load_or_convert(list(sources), tag, convert)
