"""Merging kohya-format LoRA files into PyTorch-named SD1.x UNet / CLIP text-encoder state dicts.

PASD stylizes with civitai LoRAs merged into the base weights. kohya names a module by its diffusers (UNet) or
transformers (CLIP, `text_model...`) path with every `.` turned into `_`, which is ambiguous (`to_out_0` could split
several ways). PASD resolves it by greedy attribute lookup; here each name is looked up in the set of module paths the
target state dict actually has, so a name resolves exactly or not at all.

Two merge rules:
- `alpha_scaled` (default, what kohya, diffusers and PEFT do): `W += multiplier * (alpha / rank) * up @ down`.
- `official`: PASD's `convert_lora`, which ignores `.alpha` (`W += multiplier * up @ down`) and cannot merge 3x3 conv
  LoRAs (it crashes); reproduced for parity, with a clear error instead of the crash.
Deltas are computed in float32 (LoRA files are usually float16) and the result is cast back to the target dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from pasd_jax.convert.family import check_sd1
from pasd_jax.convert.io import PathLike, load_safetensors, safetensors_metadata

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
RULES = ("alpha_scaled", "official")
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_MAX_LISTED = 20


class LoraError(ValueError):
    """A LoRA file that is malformed, of an unsupported variant, or made for another architecture."""


@dataclasses.dataclass(frozen=True)
class LoraModule:
    name: str                # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    down: np.ndarray         # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray           # (out, rank) or (out, rank, 1, 1)
    alpha: float | None      # None when the file has no `.alpha` (kohya then uses alpha = rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scale(self, multiplier: float, rule: str) -> float:
        if rule == "official":
            return multiplier
        alpha = self.alpha if self.alpha else float(self.rank)  # kohya: missing or 0 alpha means alpha = rank
        return multiplier * (alpha / self.rank)


@dataclasses.dataclass(frozen=True)
class LoraMerge:
    """Merged copies of the target dicts; `changed` lists `unet.<key>` / `text_encoder.<key>` that were updated,
    `skipped` the kohya modules of a component that was not given (None)."""
    unet: dict[str, np.ndarray] | None
    text_encoder: dict[str, np.ndarray] | None
    changed: list[str]
    skipped: list[str]


def _listed(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


def parse_kohya(state: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None,
                what: str = "LoRA") -> dict[str, LoraModule]:
    """Group a kohya LoRA state dict into modules; raise `LoraError` / `ModelFamilyError` for anything else."""
    check_sd1(state, what=what, metadata=metadata)
    parts: dict[str, dict[str, np.ndarray]] = {}
    bad = []
    for key, value in state.items():
        name, _, part = key.partition(".")
        if not name.startswith((UNET_PREFIX, TEXT_PREFIX)):
            bad.append(f"{key} (expected names starting with {UNET_PREFIX} or {TEXT_PREFIX})")
        elif part not in _PARTS:
            bad.append(f"{key} (a LoRA variant this merge does not support; expected plain LoRA parts "
                       f"{sorted(_PARTS)}, e.g. not LoHa/LoKr/DoRA/Tucker `lora_mid`)")
        else:
            parts.setdefault(name, {})[_PARTS[part]] = value
    modules = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            bad.append(f"{name}: has {sorted(p)}, expected lora_down.weight and lora_up.weight")
            continue
        down, up = p["down"], p["up"]
        conv_up_ok = up.ndim == 4 and up.shape[2:] == (1, 1)
        if not ((down.ndim == 2 and up.ndim == 2) or (down.ndim == 4 and conv_up_ok)) or up.shape[1] != down.shape[0]:
            bad.append(f"{name}: lora_down {list(down.shape)} and lora_up {list(up.shape)} do not form a rank-r "
                       "Linear or Conv2d LoRA")
            continue
        alpha = float(np.asarray(p["alpha"]).reshape(())) if "alpha" in p else None
        modules[name] = LoraModule(name, down, up, alpha)
    if bad:
        raise LoraError(f"{what}: {len(bad)} problem(s): {_listed(bad)}")
    return modules


def module_index(keys: list[str] | Mapping[str, object]) -> dict[str, list[str]]:
    """kohya-style name (module path with `.` -> `_`) -> module paths having a `.weight` in `keys`."""
    index: dict[str, list[str]] = {}
    for key in keys:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            index.setdefault(module.replace(".", "_"), []).append(module)
    return index


def _check_rule(module: LoraModule, rule: str) -> None:
    down = module.down
    if rule == "official" and down.ndim == 4 and down.shape[2:] != (1, 1):
        raise LoraError(f"{module.name}: a {down.shape[2]}x{down.shape[3]} conv LoRA (LoCon) cannot be merged with "
                        "rule='official': PASD's merge squeezes only 1x1 kernels and crashes on it ('mat2 must be a "
                        "matrix'); use rule='alpha_scaled'")


def lora_delta(module: LoraModule, rule: str = "alpha_scaled") -> np.ndarray:
    """`up @ down` in float32 with the kernel layout of the target weight (not yet scaled)."""
    _check_rule(module, rule)
    up, down = module.up.astype(np.float32), module.down.astype(np.float32)
    if down.ndim == 2:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    # a kxk `down` conv followed by a 1x1 `up` conv is one kxk conv with this kernel
    return np.tensordot(up[:, :, 0, 0], down, axes=(1, 0))  # einsum("ok,kiyx->oiyx") through BLAS


def merge_lora(lora: Mapping[str, np.ndarray], *, unet: Mapping[str, np.ndarray] | None = None,
               text_encoder: Mapping[str, np.ndarray] | None = None, multiplier: float = 1.0,
               rule: str = "alpha_scaled", metadata: Mapping[str, str] | None = None,
               what: str = "LoRA") -> LoraMerge:
    """Merge a kohya LoRA state dict into diffusers UNet / `text_model.*` CLIP dicts; inputs are not modified.

    All-or-nothing: every module must resolve to exactly one target `.weight` of matching shape before any is merged.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    modules = parse_kohya(lora, metadata=metadata, what=what)
    targets = {"unet": (UNET_PREFIX, unet), "text_encoder": (TEXT_PREFIX, text_encoder)}
    indexes = {c: module_index(list(d)) for c, (_, d) in targets.items() if d is not None}
    plan: list[tuple[str, str, LoraModule]] = []
    skipped, problems = [], []
    for name, mod in modules.items():
        comp = "unet" if name.startswith(UNET_PREFIX) else "text_encoder"
        prefix, target = targets[comp]
        if target is None:
            skipped.append(name)
            continue
        found = indexes[comp].get(name[len(prefix):], [])
        if len(found) != 1:
            problems.append(f"{name}: " + (f"matches several {comp} modules {found}" if found else
                                           f"no such module in the {comp}"))
            continue
        key = found[0] + ".weight"
        _check_rule(mod, rule)  # before anything is merged
        want = tuple(target[key].shape)
        got = (mod.up.shape[0], mod.down.shape[1], *mod.down.shape[2:])
        if got != want:
            problems.append(f"{name}: the LoRA makes a {list(got)} update, {comp} `{key}` is {list(want)}")
            continue
        plan.append((comp, key, mod))
    if problems:
        raise LoraError(f"{what} does not fit this SD1.x model ({len(problems)} of {len(modules)} modules): "
                        f"{_listed(problems)}. Expected a kohya LoRA trained on this SD1.x architecture")
    out = {c: dict(d) for c, (_, d) in targets.items() if d is not None}
    changed = []
    for comp, key, mod in plan:
        w = out[comp][key]
        delta = lora_delta(mod, rule) * np.float32(mod.scale(multiplier, rule))
        out[comp][key] = (w.astype(np.float32) + delta).astype(w.dtype)
        changed.append(f"{comp}.{key}")
    return LoraMerge(out.get("unet"), out.get("text_encoder"), changed, skipped)


def merge_lora_file(path: PathLike, *, unet: Mapping[str, np.ndarray] | None = None,
                    text_encoder: Mapping[str, np.ndarray] | None = None, multiplier: float = 1.0,
                    rule: str = "alpha_scaled") -> LoraMerge:
    """`merge_lora` on a `.safetensors` LoRA file (its kohya metadata helps tell SD2/SDXL LoRAs apart)."""
    return merge_lora(load_safetensors(path), unet=unet, text_encoder=text_encoder, multiplier=multiplier,
                      rule=rule, metadata=safetensors_metadata(path), what=str(path))
