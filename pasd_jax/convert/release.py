"""PASD checkpoints in and out: release export to the official PyTorch layout, import to our Flax layout, loading.

Export writes `unet/` and `controlnet/` exactly as the official `train_pasd.py` does (config.json + fp32
`diffusion_pytorch_model.safetensors`, the full PASD UNet including the SD base), checks what landed on disk against
the key set and shapes the modules define, and adds a README of what was trained. Import turns an official folder
into Flax-layout files (`flax_params.safetensors`, checksummed) that load without conversion.

Output folders are staged beside the target and renamed into place, so an interrupted export never leaves a
half-written release, and an existing folder is only replaced with `overwrite=True`.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import pathlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from pasd_jax.convert.base import (abstract_of, load_model_folder_with_meta, module_from_meta, to_device,
                                   weight_file_shapes)
from pasd_jax.convert.cache import ConversionCache, load_flax_params, save_flax_params
from pasd_jax.convert.folders import (CONTROLNET, UNET, check_kind, describe_folder, kind_of, style_of,
                                      to_pytorch)
from pasd_jax.convert.io import PathLike, WeightFileError, read_json, write_json
from pasd_jax.convert.tree import expected_torch_shapes
from pasd_jax.models.blocks import PLAIN
from pasd_jax.sharding.trainable_split import DEFAULT_TRAINABLE
from pasd_jax.safe_write import refuse_existing, refuse_overlap, staged_write

log = logging.getLogger(__name__)

Model = tuple[Any, Any]
SUBFOLDERS = (UNET, CONTROLNET)
FLAX_MARKER = "pasd_jax_checkpoint.json"
FLAX_WEIGHTS = "flax_params.safetensors"
FLAX_FORMAT = "pasd_jax.flax_checkpoint"


class ReleaseError(WeightFileError):
    """An export or import that cannot produce a correct folder (wrong inputs, existing output, key mismatch)."""


@dataclasses.dataclass(frozen=True)
class ReleaseInfo:
    """What the README of an exported checkpoint says about the run."""
    variant: str
    step: int | None = None
    base: str | None = None
    trainable_modules: tuple[str, ...] = DEFAULT_TRAINABLE
    source: str | None = None
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ export

def release_key_shapes(unet_module, controlnet_module) -> dict[str, dict[str, tuple[int, ...]]]:
    """PyTorch key -> shape of `unet/` and `controlnet/` of a release, from the modules alone (eval_shape)."""
    return {UNET: expected_torch_shapes(abstract_of(unet_module), style_of(UNET)),
            CONTROLNET: expected_torch_shapes(abstract_of(controlnet_module), style_of(CONTROLNET))}


def _compare(got: Mapping[str, tuple], want: Mapping[str, tuple], what: str) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(f"{k}: {list(got[k])} vs {list(want[k])}" for k in set(got) & set(want) if got[k] != want[k])
    if missing or extra or bad:
        raise ReleaseError(f"{what}: the params do not match the model ({len(missing)} missing, {len(extra)} "
                           f"unexpected, {len(bad)} mis-shaped): {(missing + extra + bad)[:20]}")


def _param_count(params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in flatten_dict(params).values()))


def _dtypes(params: Any) -> set[str]:
    return {str(np.dtype(getattr(x, "dtype", np.float32))) for x in flatten_dict(params).values()}


def readme_text(info: ReleaseInfo, counts: Mapping[str, tuple[int, int]], widened: Sequence[str]) -> str:
    """The README.md of an exported checkpoint."""
    trainable = ", ".join(f"`{m}`" for m in info.trainable_modules) or "none"
    lines = [
        "# PASD checkpoint exported by pasd-jax", "",
        f"- variant: `{info.variant}`",
        f"- training step: {info.step if info.step is not None else 'unknown'}",
        f"- SD base: {info.base or 'unknown'}",
        f"- trained: the whole ControlNet, and the UNet parameters whose names contain {trainable}; the SD base "
        "UNet weights were frozen",
        f"- exported: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
        + (f" from `{info.source}`" if info.source else ""), "",
        "| folder | tensors | parameters | dtype |", "|---|---|---|---|",
    ]
    lines += [f"| `{sub}/` | {n} | {p:,} | float32 |" for sub, (n, p) in counts.items()]
    lines += ["", "Layout and key names are those of the official PASD `train_pasd.py` checkpoints "
              "(`checkpoint-N/unet`, `checkpoint-N/controlnet`): load them with the official classes' "
              "`from_pretrained(<this folder>, subfolder=\"unet\" | \"controlnet\")` (the pasd_light classes for a "
              "pasd_light variant), or with pasd-jax: `python sample.py --ckpt <this folder>`."]
    if widened:
        lines += ["", f"Note: these components were stored as {', '.join(widened)} in training and were widened to "
                  "float32 for the release; such SD base weights are not the original float32 values."]
    lines += [f"- {n}" for n in info.notes]
    return "\n".join(lines) + "\n"


def export_release(out: PathLike, *, unet: Model, controlnet: Model, info: ReleaseInfo,
                   overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> pathlib.Path:
    """Write `out/unet`, `out/controlnet` (official layout, fp32) and `out/README.md`; returns `out`.

    `inputs`: the folders the params were read from; an `out` that overlaps one is refused."""
    out = pathlib.Path(out)
    refuse_overlap(out, inputs)
    refuse_existing(out, overwrite)
    for sub, (module, _) in ((UNET, unet), (CONTROLNET, controlnet)):
        if kind_of(module) != sub:
            raise ReleaseError(f"export: the {sub} argument holds a {kind_of(module)} module")
    if unet[0].variant == PLAIN:
        raise ReleaseError("export: the UNet is a plain SD UNet without PACA; a PASD release needs the PASD UNet")
    want = release_key_shapes(unet[0], controlnet[0])
    for sub, (module, params) in ((UNET, unet), (CONTROLNET, controlnet)):
        got = {k: tuple(v) for k, v in expected_torch_shapes(params, style_of(sub)).items()}
        _compare(got, want[sub], f"export {sub}")
    widened = [f"{sub} ({', '.join(sorted(d - {'float32'}))})" for sub, (_, p) in ((UNET, unet),
               (CONTROLNET, controlnet)) if (d := _dtypes(p)) - {"float32"}]
    for w in widened:
        log.warning("export: %s params are not float32; they are widened to float32 for the release", w)

    def write(tmp: pathlib.Path) -> None:
        counts = {}
        for sub, (module, params) in ((UNET, unet), (CONTROLNET, controlnet)):
            path = to_pytorch(module, params, tmp / sub)
            on_disk = weight_file_shapes(path)
            _compare({k: v.shape for k, v in on_disk.items()}, want[sub], f"export {sub} ({path})")
            if {v.dtype for v in on_disk.values()} != {"float32"}:
                raise ReleaseError(f"export {sub}: {path} is not all float32")
            counts[sub] = (len(on_disk), _param_count(params))
        (tmp / "README.md").write_text(readme_text(info, counts, widened))

    staged_write(out, write, inputs=inputs, overwrite=overwrite)
    log.info("exported %s (%s, step %s)", out, info.variant, info.step)
    return out


def describe_base(base: Any) -> str | None:
    """A base given as {component: folder} reads as the common parent folder when there is one."""
    if isinstance(base, Mapping):
        parents = {str(pathlib.Path(v).parent) for v in base.values()}
        names = {pathlib.Path(v).name for v in base.values()}
        if len(parents) == 1 and names <= {UNET, "vae", "text_encoder"}:
            return parents.pop()
        return ", ".join(f"{k}: {v}" for k, v in base.items())
    return None if base in (None, "") else str(base)


def lookup_config(cfg: Any, *paths: tuple[str, ...]) -> Any:
    """A value from a nested dict / ConfigDict by the first path that exists (None if none does)."""
    for path in paths:
        node = cfg
        try:
            for p in path:
                node = node[p]
        except (KeyError, TypeError, AttributeError):
            continue
        if isinstance(node, Mapping):
            continue
        return str(node) if isinstance(node, pathlib.Path) else node
    return None


# ------------------------------------------------------------------------------------------ import / load

def is_official_checkpoint(path: PathLike) -> bool:
    p = pathlib.Path(path)
    return all((p / s / "config.json").is_file() and not (p / s / FLAX_WEIGHTS).is_file() for s in SUBFOLDERS)


def is_flax_checkpoint(path: PathLike) -> bool:
    return (pathlib.Path(path) / FLAX_MARKER).is_file()


EXPECTED_SUB = {UNET: "a PASD UNet (UNet2DConditionModel config, weights with pixel_attentions / attn2_plus) in unet/",
                CONTROLNET: "a PASD ControlNet (ControlNetModel) in controlnet/"}


def check_subfolders(path: PathLike) -> None:
    """unet/ and controlnet/ hold the model kinds their names say (a VAE there fails deep in the loader)."""
    for sub in SUBFOLDERS:
        check_kind(pathlib.Path(path) / sub, sub, EXPECTED_SUB[sub])


def import_official(pasd: PathLike, out: PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """An official PASD checkpoint folder -> our Flax-layout folder (`unet/`, `controlnet/`, marker file)."""
    pasd, out = pathlib.Path(pasd), pathlib.Path(out)
    refuse_overlap(out, [pasd])
    refuse_existing(out, overwrite)
    if not is_official_checkpoint(pasd):
        raise ReleaseError(f"{pasd} is not an official PASD checkpoint ({describe_folder(pasd)}): expected unet/ and "
                           "controlnet/ folders with config.json and diffusion_pytorch_model.safetensors (as "
                           "runs/pasd/checkpoint-100000)")
    check_subfolders(pasd)
    loaded = {s: load_model_folder_with_meta(pasd / s, cache=False) for s in SUBFOLDERS}
    if loaded[UNET][0].variant == PLAIN:
        raise ReleaseError(f"{pasd / UNET} is a plain SD UNet (no pixel_attentions / attn2_plus keys): not PASD")

    def write(tmp: pathlib.Path) -> None:
        for sub, (module, params, meta) in loaded.items():
            write_json(meta["config"], tmp / sub / "config.json")
            save_flax_params(tmp / sub / FLAX_WEIGHTS, params, {**meta, "source": str(pasd / sub)})
        write_json({"format": FLAX_FORMAT, "version": 1, "variant": loaded[UNET][0].variant,
                    "source": str(pasd.resolve()), "components": list(SUBFOLDERS)}, tmp / FLAX_MARKER)

    staged_write(out, write, inputs=[pasd], overwrite=overwrite)
    log.info("imported %s -> %s (%s)", pasd, out, loaded[UNET][0].variant)
    return out


def load_flax_checkpoint(folder: PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                         remat: bool = False) -> dict[str, Model]:
    """{"unet": (module, params), "controlnet": (module, params)} of an imported folder (checksums verified)."""
    folder = pathlib.Path(folder)
    marker = read_json(folder / FLAX_MARKER, what="pasd-jax checkpoint marker")
    if marker.get("format") != FLAX_FORMAT:
        raise WeightFileError(f"{folder / FLAX_MARKER}: format {marker.get('format')!r}, expected {FLAX_FORMAT!r}")
    out = {}
    for sub in marker.get("components", SUBFOLDERS):
        params, meta, _ = load_flax_params(folder / sub / FLAX_WEIGHTS)
        module = module_from_meta(meta, params, dtype=dtype, param_dtype=param_dtype, remat=remat)
        out[sub] = (module, to_device(params, param_dtype))
    return out


def load_checkpoint(path: PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    remat: bool = False, cache: "ConversionCache | PathLike | bool | None" = None
                    ) -> dict[str, Model]:
    """What `sample.py --ckpt` loads: an imported Flax folder, or an official PyTorch folder (converted once, then
    served from the conversion cache). A `train.py` checkpoint goes through `pasd_jax.runs.export`."""
    path = pathlib.Path(path)
    if is_flax_checkpoint(path):
        return load_flax_checkpoint(path, dtype=dtype, param_dtype=param_dtype, remat=remat)
    if not is_official_checkpoint(path):
        raise WeightFileError(f"{path} is not a PASD checkpoint ({describe_folder(path)}): expected unet/ and "
                              f"controlnet/ with config.json (an official folder) or {FLAX_MARKER} (a folder written "
                              "by `pasd-convert import`)")
    check_subfolders(path)
    out = {}
    for sub in SUBFOLDERS:
        module, params, _ = load_model_folder_with_meta(path / sub, dtype=dtype, param_dtype=param_dtype,
                                                        remat=remat, cache=cache)
        out[sub] = (module, params)
    if out[UNET][0].variant == PLAIN:
        raise WeightFileError(f"{path / UNET} is a plain SD UNet: it has no PACA (pixel_attentions) or pasd_light "
                              "(attn2_plus) weights, so it is not a PASD checkpoint")
    return out
