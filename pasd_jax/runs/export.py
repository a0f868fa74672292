"""A run's trained PASD models read back from its checkpoints, and written out in the official PyTorch layout.

`restore_for_export(dir)` rebuilds the full PASD UNet (frozen SD base read from its fp32 folders + trained PACA)
and the ControlNet; `export_pytorch` writes them as `unet/` + `controlnet/` folders; `export_train_checkpoint`
writes a release (with its README and key checks). Used at the end of training, by `pasd-convert
export`, by `sample.py --ckpt <run dir>` and to fine-tune from a run. A run whose config sets
`diffusion.export_scheduler` (colorization) also gets its scheduler config written to `scheduler/` beside the
checkpoint folder, the release layout of `pasd_light_color/{checkpoint-180000, scheduler}`.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from pasd_jax.convert import to_pytorch
from pasd_jax.convert.folders import CONTROLNET, UNET
from pasd_jax.convert.io import PathLike
from pasd_jax.convert.release import DEFAULT_TRAINABLE, ReleaseInfo, describe_base, export_release, lookup_config
from pasd_jax.safe_write import atomic_write, refuse_existing, refuse_overlap
from pasd_jax.sharding import trainable_split
from pasd_jax.runs.checkpoint import CheckpointReadError, Checkpoints, checkpoint_dir, resolve_base
from pasd_jax.runs.models import abstract, build_models, load_frozen


def restore_for_export(ckpt_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """A run's trained PASD models in fp32, ready for `pasd_jax.convert.to_pytorch`.

    Returns {"unet": (PASDUNet, params incl. the frozen SD base read from its fp32 folder), "controlnet":
    (PASDControlNet, params), "metadata": {"step", "variant", "config", "model_configs", "base", "trainable"}}.
    `ckpt_dir` is a run's work dir or its checkpoints/ dir; `step` defaults to the latest finished one. A step
    that cannot be read is a `CheckpointReadError` naming the step and file, and the steps to use instead.
    """
    ckdir = checkpoint_dir(ckpt_dir)
    if not ckdir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir} does not exist: give a train.py work dir (or its checkpoints/ folder)")
    ck = Checkpoints(ckdir, read_only=True)
    try:
        step = ck.latest_step() if step is None else step
        try:
            meta = ck.metadata(step)
            meta["base"] = resolve_base(meta["base"], ckdir.parent)
            names = tuple(meta["trainable"])
            models = build_models(meta["model_configs"], meta["variant"])
            shapes = {CONTROLNET: abstract(models.controlnet),
                      UNET: trainable_split.split_unet(abstract(models.unet), names)[0]}
            trained = ck.restore_params_numpy(step, shapes)
        except CheckpointReadError as e:
            raise e.with_hint(_other_steps_hint(ck.all_steps(), e.step, ckpt_dir)) from None
    finally:
        ck.close()
    frozen = load_frozen(models, meta["base"], names, kinds=(UNET,))
    unet = trainable_split.merge(frozen[UNET], trained[UNET])
    keep = ("step", "variant", "config", "model_configs", "base", "trainable")
    return {UNET: (models.unet, unet), CONTROLNET: (models.controlnet, trained[CONTROLNET]),
            "metadata": {k: meta[k] for k in keep}}


def _other_steps_hint(steps: list[int], broken: int, ckpt_dir: str | os.PathLike) -> str:
    older = sorted((s for s in steps if s != broken), reverse=True)
    if not older:
        return "the run has no other step; nothing was changed on disk"
    return (f"other steps on disk: {', '.join(map(str, older))}; export one with `pasd-convert "
            f"export --ckpt {ckpt_dir} --step {older[0]} --out <folder>` (nothing was changed on disk)")


def export_pytorch(unet: tuple[Any, Any], controlnet: tuple[Any, Any], folder: str | os.PathLike) -> pathlib.Path:
    """Write `folder/unet` and `folder/controlnet` in the official layout (fp32 safetensors + config.json)."""
    folder = pathlib.Path(folder)
    to_pytorch(unet[0], unet[1], folder / UNET)
    to_pytorch(controlnet[0], controlnet[1], folder / CONTROLNET)
    return folder


def export_train_checkpoint(ckpt_dir: PathLike, out: PathLike, *, step: int | None = None,
                            overwrite: bool = False) -> pathlib.Path:
    """Export a `train.py` checkpoint (full PASD UNet incl. the SD base, ControlNet) as an official release."""
    out = pathlib.Path(out)
    refuse_overlap(out, [ckpt_dir])
    refuse_existing(out, overwrite)
    restored = restore_for_export(ckpt_dir, step=step)
    meta = dict(restored.get("metadata") or {})
    unet, controlnet = restored[UNET], restored[CONTROLNET]
    cfg = meta.get("config") or {}
    trainable = meta.get("trainable") or lookup_config(cfg, ("model", "trainable"), ("model", "trainable_modules"))
    info = ReleaseInfo(variant=meta.get("variant") or unet[0].variant, step=meta.get("step"),
                       base=describe_base(meta.get("base") or lookup_config(cfg, ("model", "base"))),
                       trainable_modules=tuple(trainable or DEFAULT_TRAINABLE),
                       source=str(pathlib.Path(ckpt_dir).resolve()))
    base = meta.get("base")
    inputs = [ckpt_dir, *(base.values() if isinstance(base, dict) else [])]
    written = export_release(out, unet=unet, controlnet=controlnet, info=info, overwrite=overwrite, inputs=inputs)
    scheduler = run_scheduler_to_export(cfg)
    if scheduler:
        write_scheduler_beside(written, scheduler, overwrite=overwrite)
    return written


def write_scheduler_beside(checkpoint: PathLike, scheduler: PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Copy a scheduler config (json file or its folder) to `<checkpoint>/../scheduler/scheduler_config.json`,
    where the official grayscale mode and `pasd-sample --task colorize` read it. An existing different file is
    refused unless `overwrite` (one scheduler folder serves every checkpoint beside it)."""
    src = pathlib.Path(scheduler)
    src = src if src.suffix == ".json" else src / "scheduler_config.json"
    text = src.read_text()
    json.loads(text)  # a broken file fails here, not at sampling time
    dest = pathlib.Path(checkpoint).parent / "scheduler" / "scheduler_config.json"
    if dest.is_file() and dest.read_text() != text and not overwrite:
        raise FileExistsError(f"{dest} exists with another scheduler config; remove it or export with --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(dest, lambda tmp: tmp.write_text(text))


def run_scheduler_to_export(config: Any) -> str | None:
    """The scheduler config a run's export writes beside its checkpoint: `diffusion.scheduler` when the run's
    config (a ConfigDict, dict or the JSON kept in the checkpoint metadata) sets `diffusion.export_scheduler`."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    try:
        d = config["diffusion"]
        return str(d["scheduler"]) if d.get("export_scheduler", False) else None
    except (KeyError, TypeError, AttributeError):
        return None
