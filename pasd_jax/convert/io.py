"""Reading and writing PyTorch-layout weight files as numpy arrays.

Every failure names the file and what was expected there: weights come from local paths only, so a wrong path or a
half-downloaded file is the most common user error and must be obvious.

Host memory: SD1.5 + PASD weights are about 6 GB in fp32, so every extra host copy is felt. `map_safetensors`
reads a file as read-only views of a memory map (no copy; pages come from the page cache as they are touched), and
`write_safetensors` streams tensors to disk without serialising the whole file in memory first (as
`safetensors.numpy.save_file` does). Data it writes starts 64-byte aligned, and `aligned_copy` makes 64-byte
aligned arrays: on the CPU backend `jax.device_put` aliases such host buffers instead of copying them (measured
with jax 0.10: RSS unchanged, same buffer pointer; donation copies first, so a mapped file is never written).
"""
from __future__ import annotations

import json
import mmap
import os
import pathlib
import uuid
from typing import Any, Iterator, Mapping

import numpy as np

from pasd_jax.errors import WeightFileError

PathLike = str | os.PathLike


ALIGN = 64  # what XLA's CPU client needs to alias a host buffer instead of copying it


def aligned_copy(arr: np.ndarray, dtype: Any = None) -> np.ndarray:
    """A C-contiguous, 64-byte aligned copy of `arr` in `dtype` (one copy, from any strides)."""
    dtype = np.dtype(dtype or arr.dtype)
    raw = np.empty(arr.size * dtype.itemsize + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    out = raw[start:start + arr.size * dtype.itemsize].view(dtype).reshape(arr.shape)
    np.copyto(out, arr, casting="unsafe")
    return out


def read_json(path: PathLike, what: str = "config") -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"missing {what} file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightFileError(f"cannot parse {what} file {path}: {e}") from e


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as numpy arrays (bf16 is widened to fp32, which numpy lacks)."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"missing weight file {path}")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except SafetensorError as e:
        raise WeightFileError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or still downloading: "
            "fetch it again") from e
    except TypeError as e:  # bf16 tensors: numpy has no bfloat16 through this path
        if "bfloat16" not in str(e) and "bf16" not in str(e).lower():
            raise
        out = _load_safetensors_via_raw(path)
    return out


def _load_safetensors_via_raw(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Parse the safetensors container by hand so bf16 tensors can be widened to fp32 without torch."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        buf = raw[base + lo:base + hi]
        if meta["dtype"] == "BF16":
            u16 = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = u16.view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=_ST_DTYPES[meta["dtype"]]).copy()
        out[k] = arr.reshape(meta["shape"])
    return out


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def safetensors_header(path: pathlib.Path) -> tuple[dict[str, Any], int, int]:
    """(header, data start, file size) of a safetensors file, checked against truncation."""
    if not path.is_file():
        raise WeightFileError(f"missing weight file {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise WeightFileError(f"{path} is not a readable safetensors file (header length {n}, file size "
                                  f"{size}); it may be truncated or still downloading: fetch it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{path}: damaged safetensors header ({e}); fetch the file again") from e
    end = max([int(m["data_offsets"][1]) for k, m in header.items() if k != "__metadata__"] or [0])
    if 8 + n + end > size:
        raise WeightFileError(f"{path} is truncated: its header describes {8 + n + end:,} bytes but the file has "
                              f"{size:,}; fetch it again")
    return header, 8 + n, size


class MappedSafetensors(Mapping[str, np.ndarray]):
    """The tensors of a `.safetensors` file as read-only views of one memory map (bf16 widened to fp32 on access).

    `release=True` suits a conversion that reads each tensor once: on every access the pages of the previously
    read tensor are dropped from this process (MADV_DONTNEED on a read-only mapping; if still used they are read
    again from the page cache), so about one source tensor stays resident instead of the whole file.
    """

    def __init__(self, path: PathLike, release: bool = False):
        self.path = pathlib.Path(path)
        header, self._start, size = safetensors_header(self.path)
        self.metadata = dict(header.pop("__metadata__", None) or {})
        self._meta = header
        self._release = release and hasattr(mmap, "MADV_DONTNEED")
        self._last: tuple[int, int] | None = None
        self._map = None
        if size > self._start:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self._meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __contains__(self, key: object) -> bool:
        return key in self._meta

    def __getitem__(self, key: str) -> np.ndarray:
        meta = self._meta[key]
        lo, hi = (self._start + int(o) for o in meta["data_offsets"])
        dtype = meta["dtype"]
        if dtype != "BF16" and dtype not in _ST_DTYPES:
            raise WeightFileError(f"{self.path}: tensor {key} has unsupported dtype {dtype}")
        self._drop_last()
        self._last = (lo, hi)
        if hi == lo:
            return np.zeros(meta["shape"], np.float32 if dtype == "BF16" else _ST_DTYPES[dtype])
        if dtype == "BF16":
            u16 = np.frombuffer(self._map, dtype="<u2", count=(hi - lo) // 2, offset=lo)
            wide = aligned_copy(u16, np.uint32)
            wide <<= 16
            return wide.view(np.float32).reshape(meta["shape"])
        dt = np.dtype(_ST_DTYPES[dtype]).newbyteorder("<")
        return np.frombuffer(self._map, dtype=dt, count=(hi - lo) // dt.itemsize, offset=lo).reshape(meta["shape"])

    def _drop_last(self) -> None:
        if not self._release or self._last is None or self._map is None:
            return
        page = mmap.PAGESIZE
        lo, hi = self._last
        start = lo - lo % page
        if hi > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, hi - start)


def _mapping_of(arr: np.ndarray) -> "mmap.mmap | None":
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def release_pages(arr: Any) -> bool:
    """Drop the resident pages of a read-only memory-mapped view (MADV_DONTNEED); True if it was one.

    Why: a view of the converted-weight cache that was read once (checksum, cast, placement) otherwise stays in
    the process's resident memory beside the copy made from it, for the pipeline's life. The view stays valid:
    pages are read again (from the page cache) if it is used again."""
    if not isinstance(arr, np.ndarray) or arr.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    mapping = _mapping_of(arr)
    if mapping is None or mapping.closed:
        return False
    start = np.frombuffer(mapping, np.uint8, count=1).ctypes.data
    offset = arr.ctypes.data - start
    lo = offset - offset % mmap.PAGESIZE
    hi = min(len(mapping), offset + arr.nbytes)
    try:
        mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):
        return False
    return True


def map_safetensors(path: PathLike, release: bool = False) -> MappedSafetensors:
    """`MappedSafetensors(path, release)`: every tensor as a read-only view, nothing copied up front."""
    return MappedSafetensors(path, release=release)


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"missing weight file {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise WeightFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from e


def load_torch_file(path: PathLike) -> dict[str, np.ndarray]:
    """A pickled PyTorch `.bin`/`.ckpt`/`.pt` state dict; needs the optional `torch` extra."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"missing weight file {path}")
    try:
        import torch
    except ImportError as e:
        raise WeightFileError(
            f"{path} is a pickled PyTorch file; reading it needs torch: pip install 'pasd-jax[torch]' "
            "(or convert it to .safetensors elsewhere)") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt pickles
        raise WeightFileError(f"cannot read PyTorch file {path}: {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if v.dtype == torch.bfloat16:
                v = v.float()
            out[k] = v.numpy()
    return out


def load_weights(path: PathLike, *, mapped: bool = False) -> Mapping[str, np.ndarray]:
    """Any supported weight file, chosen by extension. `mapped=True` memory-maps a safetensors file instead of copying it
    (read-only views, pages released as a conversion moves on; see `MappedSafetensors`)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return map_safetensors(path, release=True) if mapped else load_safetensors(path)
    if path.suffix in (".bin", ".ckpt", ".pt", ".pth"):
        return load_torch_file(path)
    raise WeightFileError(f"unsupported weight file {path}: expected .safetensors, .bin, .ckpt, .pt or .pth")


def find_weight_file(folder: PathLike, stems: tuple[str, ...]) -> pathlib.Path:
    """The weight file of a diffusers/transformers folder; safetensors preferred over .bin."""
    folder = pathlib.Path(folder)
    for ext in (".safetensors", ".bin"):
        for stem in stems:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    names = ", ".join(f"{s}.safetensors" for s in stems)
    raise WeightFileError(f"no weight file in {folder}: expected one of {names} (or the .bin equivalent)")


def save_safetensors(tensors: Mapping[str, np.ndarray], path: PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves a truncated file behind."""
    write_safetensors(tensors, path, metadata)


def _write_tensors(f: Any, arrays: list[np.ndarray]) -> None:
    for a in arrays:
        if a.nbytes:
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))


_DTYPE_NAMES = {np.dtype(v).str.lstrip("<>|="): k for k, v in _ST_DTYPES.items()}


def write_safetensors(tensors: Mapping[str, np.ndarray], path: PathLike,
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
    """A standard safetensors file written tensor by tensor (at most one tensor copied at a time, and only if it is
    not C-contiguous), atomically (temp file + rename).

    The header is padded with spaces so the data starts 64-byte aligned, and tensors whose sizes are multiples of
    64 bytes come first, so a memory map of the file hands out aligned views of them."""
    path = pathlib.Path(path)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    order = sorted(arrays, key=lambda k: (arrays[k].nbytes % ALIGN != 0, k))
    offset = 0
    for k in order:
        a = arrays[k]
        name = "BF16" if a.dtype.name == "bfloat16" else _DTYPE_NAMES.get(a.dtype.str.lstrip("<>|="))
        if name is None or a.dtype.byteorder == ">":
            raise ValueError(f"cannot write tensor {k} of dtype {a.dtype} to safetensors")
        header[k] = {"dtype": name, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((-(8 + len(head))) % ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            _write_tensors(f, [arrays[k] for k in order])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(obj: Mapping[str, Any], path: PathLike) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
