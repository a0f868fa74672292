"""Hugging Face Hub names for weights: `org/name[@revision][:subfolder]` -> a folder in the HF cache.

    resolve_base("stable-diffusion-v1-5/stable-diffusion-v1-5")           # VAE, text encoder, tokenizer, scheduler
    resolve_pasd("yangtao9009/PASD", subfolder="pasd/checkpoint-100000")  # unet/ + controlnet/

Only the files a component needs are fetched (`allow_patterns`: its config and one weight file, safetensors
before `.bin`; never the fp16 / EMA copies or the SD repo's multi-GB single files), into the standard HF cache
(`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), so a second run reads them offline.
`HF_HUB_OFFLINE=1` is honoured: only the cache is read, and a name not in it is a one-line error.
An existing local path always wins over a Hub name.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Sequence

from pasd_jax.convert.folders import CONTROLNET, DIFFUSERS_STEMS, TEXT_ENCODER, TRANSFORMERS_STEMS, UNET, VAE
from pasd_jax.convert.io import PathLike, WeightFileError
from pasd_jax.convert.release import FLAX_MARKER, FLAX_WEIGHTS  # the `convert import` layout

_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+?))?(?::(?P<sub>[^:]+))?$")
_TRUE = {"1", "on", "yes", "true"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
BASE_COMPONENTS = (VAE, TEXT_ENCODER)
PASD_COMPONENTS = (UNET, CONTROLNET)


def parse_name(spec: str, subfolder: str | None = None) -> tuple[str, str | None, str] | None:
    """(repo id, revision, subfolder) if `spec` is a Hub name and no local path; else None."""
    spec = str(spec)
    if pathlib.Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or "\\" in spec:
        return None
    m = _NAME.match(spec)
    if m is None:
        return None
    sub = m.group("sub") or ""
    if subfolder:
        sub = f"{sub}/{subfolder}" if sub else subfolder
    return m.group("repo"), m.group("rev"), sub.strip("/")


def is_hub_name(spec: PathLike | None) -> bool:
    return spec is not None and parse_name(str(spec)) is not None


def offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> pathlib.Path:
    """The HF hub cache, read from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return pathlib.Path(constants.HF_HUB_CACHE)


def _weights(prefix: str, component: str, ext: str) -> list[str]:
    stems = TRANSFORMERS_STEMS if component == TEXT_ENCODER else DIFFUSERS_STEMS
    return [f"{prefix}{component}/{stem}{ext}" for stem in stems]


def _patterns(prefix: str, components: Sequence[str], ext: str, extras: bool) -> list[str]:
    out = [p for c in components for p in _weights(prefix, c, ext)]
    if extras:
        out += [f"{prefix}{c}/config.json" for c in components]
        out += [f"{prefix}model_index.json", f"{prefix}tokenizer/*", f"{prefix}scheduler/scheduler_config.json"]
    return out


def _download(repo: str, revision: str | None, patterns: list[str], flag: str, spec: str) -> pathlib.Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    where = cache_dir()
    try:
        return pathlib.Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=where,
                                              local_files_only=offline()))
    except hf.LocalEntryNotFoundError as e:
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if offline()
               else f"the Hugging Face Hub cannot be reached ({type(e.__cause__ or e).__name__})")
        raise WeightFileError(f"{flag} {spec}: no local path of that name, and the Hugging Face model {repo} is not "
                              f"in the cache {where} while {why}; run once with network access (or `hf download "
                              f"{repo}`), set HF_HOME to the cache that holds it, or give a local folder") from None
    except getattr(hf, "IncompleteSnapshotError", ()) as e:  # huggingface_hub >= 1.x
        raise WeightFileError(f"{flag} {spec}: the cached copy of {repo} in {where} is incomplete and the Hub "
                              f"cannot be reached; run once with network access ({e})") from None
    except (hf.RepositoryNotFoundError, hf.GatedRepoError) as e:
        raise WeightFileError(f"{flag} {spec} is neither a local path nor a Hugging Face model the Hub gives "
                              f"access to ({type(e).__name__}); check the name, or `hf auth login` for a gated or "
                              "private model") from None
    except hf.RevisionNotFoundError:
        raise WeightFileError(f"{flag} {spec}: the Hugging Face model {repo} has no revision {revision!r}") from None
    except hf.HfHubHTTPError as e:
        raise WeightFileError(f"{flag} {spec}: downloading from the Hugging Face Hub failed ({e})") from None


def _missing(folder: pathlib.Path, components: Sequence[str]) -> list[str]:
    missing = []
    for c in components:
        stems = TRANSFORMERS_STEMS if c == TEXT_ENCODER else DIFFUSERS_STEMS
        if not (folder / c / "config.json").is_file():
            missing.append(f"{c}/config.json")
        elif not any((folder / c / f"{s}{e}").is_file() for s in stems for e in (".safetensors", ".bin")):
            missing.append(f"{c}/{stems[0]}.safetensors")
    return missing


def resolve(spec: PathLike, components: Sequence[str], *, subfolder: str | None = None,
            flag: str = "--base") -> pathlib.Path:
    """A local path (returned as given) or a Hub name fetched to the cache: the folder holding `components`
    (or a single weight file when the subfolder names one)."""
    parsed = parse_name(str(spec), subfolder)
    if parsed is None:
        return pathlib.Path(spec) / subfolder if subfolder else pathlib.Path(spec)
    repo, revision, sub = parsed
    shown = f"{spec}" + (f" (subfolder {subfolder})" if subfolder else "")
    if sub.endswith(SINGLE_FILE_SUFFIXES):  # e.g. a single-file SD checkpoint in a repo
        return _download(repo, revision, [sub], flag, shown) / sub
    prefix = f"{sub}/" if sub else ""
    patterns = _patterns(prefix, components, ".safetensors", extras=True)
    if flag == "--ckpt":  # a folder written by `pasd-convert import`, uploaded as it is
        patterns += [f"{prefix}{FLAX_MARKER}"] + [f"{prefix}{c}/{FLAX_WEIGHTS}" for c in components]
        # the release layout keeps a scheduler beside the checkpoint (pasd_light_color/scheduler next to
        # pasd_light_color/checkpoint-180000): colorization samples with it
        parent = sub.rpartition("/")[0]
        patterns.append(f"{parent + '/' if parent else ''}scheduler/scheduler_config.json")
    root = _download(repo, revision, patterns, flag, shown)
    folder = root / sub if sub else root
    if (folder / FLAX_MARKER).is_file():
        return folder
    if _missing(folder, components):  # no safetensors: the .bin files (read through the torch extra)
        _download(repo, revision, _patterns(prefix, components, ".bin", extras=False), flag, shown)
    missing = _missing(folder, components)
    if missing:
        hint = (" (for yangtao9009/PASD: yangtao9009/PASD:pasd/checkpoint-100000)"
                if tuple(components) == PASD_COMPONENTS else "")
        raise WeightFileError(f"{flag} {shown}: the Hugging Face model {repo} has no {', '.join(missing)}"
                              f"{' under ' + sub if sub else ''}; give the subfolder that holds "
                              f"{' and '.join(c + '/' for c in components)}{hint}")
    return folder


def resolve_base(spec: PathLike, components: Sequence[str] = BASE_COMPONENTS, *, subfolder: str | None = None,
                 flag: str = "--base") -> pathlib.Path:
    """An SD1.5 base (diffusers layout) by path or Hub name; `components` are the model folders needed (sampling:
    VAE + text encoder; training adds the UNet). The tokenizer and scheduler come along."""
    return resolve(spec, components, subfolder=subfolder, flag=flag)


def resolve_pasd(spec: PathLike, *, subfolder: str | None = None, flag: str = "--ckpt") -> pathlib.Path:
    """A PASD checkpoint (unet/ + controlnet/, official or convert-import layout) by path or Hub name."""
    return resolve(spec, PASD_COMPONENTS, subfolder=subfolder, flag=flag)
