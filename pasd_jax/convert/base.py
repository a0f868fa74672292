"""Loading a Stable Diffusion 1.x base (UNet, VAE, CLIP text encoder, tokenizer, scheduler) into Flax.

Two sources, one result: a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`;
safetensors, or `.bin` through the torch extra) or an original-LDM single file (`.safetensors`, `.ckpt` through torch)
whose configs come from `base` (a diffusers folder) or the SD1.5 configs shipped with the package.

The model family is checked first, from the safetensors header alone where possible, so an SDXL, SD2 or damaged
file is refused in milliseconds with a message naming what was found and what was expected, before gigabytes are
read. Known non-weight keys (CLIP `position_ids`, EMA copies, DDPM schedule buffers) are ignored and reported;
everything else must map exactly. Conversions go through the converted-weights cache (`cache.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from pasd_jax.convert import progress
from pasd_jax.convert.cache import ConversionCache, cached, config_digest, resolve_cache
from pasd_jax.convert.family import LDM_CLIP, LDM_VAE, check_sd1
from pasd_jax.convert.folders import (DIFFUSERS_STEMS, TEXT_ENCODER, TRANSFORMERS_STEMS, UNET, VAE,
                                      abstract_params, build_module, detect_kind, detect_unet_variant, style_of)
from pasd_jax.convert.io import (PathLike, WeightFileError, aligned_copy, find_weight_file, load_weights,
                                 read_json, release_pages, safetensors_header)
from pasd_jax.convert.ldm import ASSETS_SD15, base_configs, ldm_to_diffusers
from pasd_jax.convert.naming import torch_key
from pasd_jax.convert.tree import torch_to_flax
from pasd_jax.models.blocks import PASD, PLAIN

log = logging.getLogger(__name__)

COMPONENTS = (UNET, VAE, TEXT_ENCODER)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, read from a file header without its data."""
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class SDBase:
    """A loaded SD1.x base: (module, params) per requested component (None if not requested).

    `unet` is a plain SD UNet (variant "sd"); `ignored` lists the non-weight keys that were skipped.
    """
    unet: tuple[Any, Any] | None
    vae: tuple[Any, Any] | None
    text_encoder: tuple[Any, Any] | None
    tokenizer_dir: pathlib.Path
    scheduler_config: pathlib.Path
    source: pathlib.Path
    ignored: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ file headers

def weight_file_shapes(path: PathLike) -> dict[str, TensorInfo]:
    """Key -> shape/dtype of a weight file; safetensors from the header only (and checked for truncation)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"missing weight file {path}")
    if path.suffix != ".safetensors":
        return {k: TensorInfo(tuple(v.shape), str(v.dtype)) for k, v in load_weights(path).items()}
    header, _, _ = safetensors_header(path)  # checked against truncation
    return {k: TensorInfo(tuple(m["shape"]), _ST_DTYPES.get(m["dtype"], m["dtype"]))
            for k, m in header.items() if k != "__metadata__"}


def check_family(path: PathLike, what: str | None = None) -> dict[str, TensorInfo]:
    """Refuse weights of another model family (SDXL, SD2, inpainting, ...) before loading them; returns the shapes."""
    shapes = weight_file_shapes(path)
    if not shapes:
        raise WeightFileError(f"{path} holds no tensors")
    check_sd1(shapes, what=what or str(path))
    return shapes


# ------------------------------------------------------------------------------------------ model folders

@functools.lru_cache(maxsize=16)
def abstract_of(module) -> Any:
    """`abstract_params`, memoised per module (modules are hashable): tracing a UNet takes seconds."""
    return abstract_params(module)


def convert_state(module, kind: str, state: Mapping[str, Any], *, what: str) -> Any:
    """Strictly map a PyTorch-named dict onto the module's tree (fp32 numpy leaves; CLIP position_ids skipped)."""
    return torch_to_flax(state, abstract_of(module), style=style_of(kind), what=what,
                         ignore=lambda k: kind == TEXT_ENCODER and k.endswith("position_ids"))


def _param_torch_keys(kind: str, params: Any) -> list[str]:
    return [torch_key(p, style_of(kind)) for p in flatten_dict(params)]


def module_from_meta(meta: Mapping[str, Any], params: Any, *, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, remat: bool = False):
    """Rebuild the Flax module a cached/imported tree belongs to (the ControlNet's switches come from its keys)."""
    kind = meta["kind"]
    return build_module(kind, meta["config"], variant=meta.get("variant", PASD),
                        keys=_param_torch_keys(kind, params), dtype=dtype, param_dtype=param_dtype, remat=remat,
                        where=str(meta.get("source", "")))


def _place_leaf(a: Any, dtype: np.dtype, placement: Any = None) -> jax.Array:
    if isinstance(a, jax.Array):
        return a if a.dtype == dtype else a.astype(dtype)
    a = np.asarray(a)
    if a.dtype != dtype or not a.flags.c_contiguous:
        source, a = a, aligned_copy(a, dtype)  # one host copy, in the target dtype, that the CPU device can alias
        release_pages(source)  # a mapped cache view read once: its pages leave the resident memory
    return jax.device_put(a, placement)


def to_device(params: Any, param_dtype: Any, placement: Any = None) -> Any:
    """numpy leaves -> jax arrays in the parameter dtype, leaf by leaf (onto `placement`, a sharding, if given).

    On the CPU backend a 64-byte aligned host array of the right dtype (a mapped cache entry, a converted tree) is
    aliased, not copied, so the weights exist once; a leaf of another dtype costs one copy of that leaf only."""
    dtype = np.dtype(param_dtype)
    return jax.tree_util.tree_map(lambda a: _place_leaf(a, dtype, placement), params)


def _folder_convert(folder: pathlib.Path, config: Mapping[str, Any], kind: str, weights: pathlib.Path):
    def convert():
        state = load_weights(weights, mapped=True)  # views of the file: the source is never copied whole
        if kind == UNET:
            check_sd1(state, what=str(weights))
        variant = detect_unet_variant(state) if kind == UNET else PASD
        module = build_module(kind, config, variant=variant, keys=state.keys(), where=str(folder))
        with progress.stage(str(folder), f"converting {weights.name} to the Flax layout", weights.stat().st_size,
                            "convert"):
            params = convert_state(module, kind, state, what=f"{kind} weights {weights}")
        ignored = sorted(k for k in state if k.endswith("position_ids"))
        return params, {"kind": kind, "config": dict(config), "variant": variant, "ignored": ignored,
                        "source": str(folder)}
    return convert


def load_model_folder_with_meta(folder: PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                                remat: bool = False, cache: "ConversionCache | PathLike | bool | None" = None
                                ) -> tuple[Any, Any, dict]:
    """`load_model_folder` plus the entry's meta (kind, config, variant, ignored keys, source)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise WeightFileError(f"model folder {folder} does not exist")
    config = read_json(folder / "config.json", what=f"config of {folder}")
    kind = detect_kind(config, str(folder / "config.json"))
    weights = find_weight_file(folder, TRANSFORMERS_STEMS if kind == TEXT_ENCODER else DIFFUSERS_STEMS)
    if kind == UNET and weights.suffix == ".safetensors":
        check_family(weights)
    params, meta = cached(resolve_cache(cache), [folder / "config.json", weights], {"op": "folder"},
                          _folder_convert(folder, config, kind, weights))
    if meta.get("ignored"):
        log.info("%s: ignored %d non-weight key(s): %s", folder, len(meta["ignored"]), ", ".join(meta["ignored"]))
    module = module_from_meta(meta, params, dtype=dtype, param_dtype=param_dtype, remat=remat)
    return module, to_device(params, param_dtype), meta


def load_model_folder(folder: PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                      remat: bool = False, cache: "ConversionCache | PathLike | bool | None" = None
                      ) -> tuple[Any, Any]:
    """`from_pytorch` through the conversion cache: (module, params) of a UNet/ControlNet/VAE/CLIP folder."""
    module, params, _ = load_model_folder_with_meta(folder, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                                    cache=cache)
    return module, params


# ------------------------------------------------------------------------------------------ single files

def _has_component(shapes: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) and not k.endswith("position_ids") for k in shapes)


def convert_single_file(path: PathLike, configs: Mapping[str, Mapping[str, Any] | None], *,
                        cache: "ConversionCache | PathLike | bool | None" = None
                        ) -> dict[str, tuple[Any, dict] | None]:
    """Flax params (fp32 numpy) + meta per component of an LDM single file, converted against `configs`.

    `configs[c]` None means "not wanted". A wanted component the file does not hold comes back as None. The UNet
    is converted as a plain SD UNet (variant "sd"). One read of the file serves all components; each is cached.
    """
    path = pathlib.Path(path)
    shapes = check_family(path)
    present = {UNET: True, VAE: _has_component(shapes, LDM_VAE), TEXT_ENCODER: _has_component(shapes, LDM_CLIP)}
    wanted = [c for c in COMPONENTS if configs.get(c) is not None and present[c]]
    store = resolve_cache(cache)
    tags = {c: {"op": "ldm", "component": c, "config": config_digest(configs[c])} for c in wanted}
    out: dict[str, tuple[Any, dict] | None] = {c: None for c in COMPONENTS if configs.get(c) is not None}
    hits = {c: store.lookup([path], tags[c]) for c in wanted} if store else {}
    if wanted and all(hits.get(c) for c in wanted):
        out.update({c: hits[c] for c in wanted})
        return out

    def convert():
        state = load_weights(path, mapped=True)
        return ldm_to_diffusers(state, unet_config=configs[UNET] if UNET in wanted else None,
                                vae_config=configs[VAE] if VAE in wanted else None,
                                text_config=configs[TEXT_ENCODER] if TEXT_ENCODER in wanted else None,
                                what=str(path))

    if UNET not in wanted:
        raise ValueError("convert_single_file needs the UNet config (it defines the LDM block layout)")
    conv = store.note_conversion([path], tags[UNET], convert) if store else convert()
    if conv.ignored:
        log.info("%s: ignored %d non-weight key(s): %s", path, len(conv.ignored), ", ".join(conv.ignored[:20]))
    for comp in wanted:
        module = build_module(comp, configs[comp], variant=PLAIN)
        source = getattr(conv, comp)
        with progress.stage(str(path), f"converting the {comp} to the Flax layout",
                            sum(int(v.nbytes) for v in source.values()), "convert"):
            params = convert_state(module, comp, source, what=f"{comp} of {path}")
        meta = {"kind": comp, "config": dict(configs[comp]), "variant": PLAIN if comp == UNET else PASD,
                "ignored": list(conv.ignored), "source": str(path)}
        if store:
            store.store([path], tags[comp], params, meta)
        out[comp] = (params, meta)
    return out


# ------------------------------------------------------------------------------------------ the base

def _first_existing(*candidates: pathlib.Path | None) -> pathlib.Path:
    for c in candidates:
        if c is not None and c.exists():
            return c
    raise WeightFileError(f"none of {[str(c) for c in candidates if c is not None]} exists")


def _check_tokenizer(tokenizer_dir: pathlib.Path, text_encoder: tuple[Any, Any] | None) -> None:
    vocab = tokenizer_dir / "vocab.json"
    if text_encoder is None or not vocab.is_file():
        return
    n = len(read_json(vocab, what="tokenizer vocabulary"))
    want = text_encoder[0].config.vocab_size
    if n > want:
        log.warning("tokenizer %s has %d tokens but the text encoder's vocabulary has %d: token ids past %d "
                    "would be out of range", tokenizer_dir, n, want, want - 1)


def _refuse_pasd_unet(folder: pathlib.Path, variant: str) -> None:
    if variant != PLAIN:
        raise WeightFileError(f"{folder} is a PASD UNet ({variant}), not an SD1.x base UNet; load it as a PASD "
                              "checkpoint (--ckpt), not as --base")


def _load_component_folders(folders: Mapping[str, pathlib.Path], where: str, kw: Mapping[str, Any]
                            ) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    loaded: dict[str, tuple[Any, Any]] = {}
    ignored: list[str] = []
    for comp, sub in folders.items():
        if not (sub / "config.json").is_file():
            raise WeightFileError(f"{where} is not a diffusers SD1.x base: missing {sub}/config.json (expected "
                                  "unet/, vae/, text_encoder/ with config.json and weights)")
        if comp == UNET:
            weights = find_weight_file(sub, DIFFUSERS_STEMS)
            if weights.suffix == ".safetensors":  # refuse before converting; a .bin is checked after loading
                _refuse_pasd_unet(sub, detect_unet_variant(weight_file_shapes(weights)))
        module, params, meta = load_model_folder_with_meta(sub, **kw)
        if comp == UNET:
            _refuse_pasd_unet(sub, module.variant)
        loaded[comp] = (module, params)
        ignored += meta.get("ignored", [])
    return loaded, ignored


def load_sd_base(path: "PathLike | Mapping[str, PathLike]", *, base: PathLike | None = None,
                 components: Sequence[str] = COMPONENTS, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, remat: bool = False,
                 cache: "ConversionCache | PathLike | bool | None" = None) -> SDBase:
    """An SD1.x base from a diffusers folder or an LDM single file, as Flax (module, params) per component.

    `path` may also map components to their folders (as a `train.py` checkpoint records its frozen base).
    `base` (a diffusers folder) supplies the configs of a single file and, if the file lacks them, the VAE or text
    encoder weights; without it the shipped SD1.5 configs are used. The tokenizer and scheduler config come from
    the folder (or `base`), else the SD1.5 ones shipped with the package.
    """
    base = pathlib.Path(base) if base is not None else None
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; expected a subset of {COMPONENTS}")
    ignored: list[str] = []
    kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, cache=cache)
    if isinstance(path, Mapping):
        absent = [c for c in components if c not in path]
        if absent:
            raise WeightFileError(f"SD base folders {dict(path)} lack {absent}")
        folders = {c: pathlib.Path(path[c]) for c in components}
        loaded, ignored = _load_component_folders(folders, str(dict(path)), kw)
        parents = {pathlib.Path(p).parent for p in path.values()}
        folder = parents.pop() if len(parents) == 1 else None
        path = folder or next(iter(folders.values()))
    elif (path := pathlib.Path(path)).is_dir():
        loaded, ignored = _load_component_folders({c: path / c for c in components}, str(path), kw)
        folder = path
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise WeightFileError(f"{path}: expected a diffusers SD1.x folder or a single-file checkpoint "
                                  f"({', '.join(SINGLE_FILE_SUFFIXES)})")
        loaded = {}
        shapes = check_family(path)
        present = {VAE: _has_component(shapes, LDM_VAE), TEXT_ENCODER: _has_component(shapes, LDM_CLIP)}
        for comp in components:
            if not present.get(comp, True) and (base is None or not (base / comp / "config.json").is_file()):
                raise WeightFileError(f"{path} holds no {comp} weights (a pruned file?); pass --base with a "
                                      f"diffusers SD1.x folder that has {comp}/ to take them from")
        cfg = base_configs(base)
        got = convert_single_file(path, {c: cfg[c] for c in COMPONENTS if c in components or c == UNET},
                                  cache=cache)
        for comp in components:
            if got.get(comp) is None:
                log.info("%s has no %s weights: taking them from %s", path, comp, base / comp)
                loaded[comp] = load_model_folder(base / comp, **kw)
                continue
            params, meta = got[comp]
            loaded[comp] = (module_from_meta(meta, params, dtype=dtype, param_dtype=param_dtype, remat=remat),
                            to_device(params, param_dtype))
            ignored = list(meta.get("ignored", []))
        folder = base
    else:
        raise WeightFileError(f"SD base {path} does not exist: expected a diffusers SD1.x folder or a single-file "
                              "checkpoint (.safetensors, .ckpt)")
    tokenizer = _first_existing(folder / "tokenizer" if folder else None, base / "tokenizer" if base else None,
                                ASSETS_SD15 / "tokenizer")
    scheduler = _first_existing(folder / "scheduler" / "scheduler_config.json" if folder else None,
                                base / "scheduler" / "scheduler_config.json" if base else None,
                                ASSETS_SD15 / "scheduler" / "scheduler_config.json")
    _check_tokenizer(tokenizer, loaded.get(TEXT_ENCODER))
    return SDBase(unet=loaded.get(UNET), vae=loaded.get(VAE), text_encoder=loaded.get(TEXT_ENCODER),
                  tokenizer_dir=tokenizer, scheduler_config=scheduler, source=path,
                  ignored=tuple(sorted(set(ignored))))

