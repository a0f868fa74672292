"""Reading and writing PyTorch-layout weight files as numpy arrays.

Every failure names the file and what was expected there: weights come from local paths only, so a wrong path or a
half-downloaded file is the most common user error and must be obvious.
"""
from __future__ import annotations

import json
import os
import pathlib
import uuid
from typing import Any, Mapping

import numpy as np

from pasd_jax.errors import WeightFileError

PathLike = str | os.PathLike


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


def load_weights(path: PathLike) -> dict[str, np.ndarray]:
    """Any supported weight file, chosen by extension."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
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
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
