"""How much of each LoRA module goes into which weight, and the update itself (float32, PyTorch layout).

Scaling rules (the fused weight is `W + multiplier * scale * delta`):

- rule `official` (PASD's `load_dreambooth_lora` -> `convert_lora`; kohya files only): `scale = 1`, `.alpha`
  ignored. Its merge squeezes 1x1 kernels and crashes on kxk conv LoRAs, Tucker cores and LyCORIS modules; those
  are refused here with a clear error instead.
- rule `alpha_scaled` (default), what diffusers 0.29.2 `load_lora_weights` + `fuse_lora(lora_scale=multiplier)`
  does, per component (UNet, text encoder), for kohya and diffusers/PEFT-named plain LoRAs:
  `scale = alpha / rank`, `rank = lora_down.shape[0]`. A module without an alpha gets the component's most common
  alpha (diffusers builds one `lora_alpha` plus an `alpha_pattern`). A component whose file has **no alphas at all**
  gets `alpha = rank of the first module` (diffusers 0.29.2 `get_peft_kwargs`: `r = lora_alpha = <first lora_B
  rank>`, then only `r` is updated), so with mixed ranks a module scales by `first_rank / rank`, not 1. "First" is
  the first `lora_B` key (diffusers/PEFT names) or `lora_down` key (kohya) in file order (safetensors: sorted);
  for the text encoder diffusers reads it from layer 0's `self_attn.out_proj`. An alpha of 0 counts as none (kohya).
  diffusers files never carry `.alpha` keys (0.29.2 refuses them); such keys are honoured like kohya's.
  Not reproduced on purpose: diffusers' wrong `alpha_pattern` keys for CLIP attention projections (modules with an
  odd alpha there silently get the most common one, see shared/golden/lora/README.md); the file's alpha is used.
- With a PEFT `adapter_config.json` beside the weights (non-kohya keys): PEFT's own rule, `scale = alpha / r`
  (`alpha / sqrt(r)` with `use_rslora`), `alpha` from the file's `.alpha`, else `alpha_pattern`, else `lora_alpha`.
- LyCORIS (LoCon-Tucker `lora_mid`, LoHa, LoKr; diffusers cannot load them): LyCORIS' rule, `scale = alpha / rank`
  with a missing or 0 alpha meaning `alpha = rank`; a LoKr with both Kronecker factors full has scale 1.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Mapping, Sequence

import numpy as np

from pasd_jax.convert.lora_formats import (KOHYA, LOHA, LOKR, LORA, TEXT_ENCODER, UNET, LoraError, LoraFile,
                                           LoraModule, listed)

RULES = ("alpha_scaled", "official")
_OUT_PROJ = re.compile(r"layers[._](\d+)[._]self_attn[._]out_proj$")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"LoRA rule must be one of {RULES}, got {rule!r}")


# ------------------------------------------------------------------------------------------ scales

def _official_check(m: LoraModule, lora: LoraFile) -> None:
    if lora.format != KOHYA:
        raise LoraError(f"{lora.what}: rule='official' (PASD's merge) reads only kohya files (lora_unet_* / "
                        f"lora_te_*), this is a {lora.format} LoRA; use rule='alpha_scaled'")
    down = m.parts.get("down")
    if not m.is_plain:
        raise LoraError(f"{m.name}: a {m.kind if m.kind != LORA else 'Tucker (lora_mid)'} module cannot be merged "
                        "with rule='official': PASD's merge knows only lora_up/lora_down; use rule='alpha_scaled'")
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        raise LoraError(f"{m.name}: a {down.shape[2]}x{down.shape[3]} conv LoRA (LoCon) cannot be merged with "
                        "rule='official': PASD's merge squeezes only 1x1 kernels and crashes on it ('mat2 must be a "
                        "matrix'); use rule='alpha_scaled'")


def _lycoris_scale(m: LoraModule) -> float:
    if m.kind == LOKR and m.rank == 0:
        return 1.0
    return (m.alpha if m.alpha is not None else m.rank) / m.rank


def _first_module(mods: list[LoraModule], component: str) -> LoraModule:
    if component == TEXT_ENCODER:
        layers = [(int(x.group(1)), m) for m in mods if (x := _OUT_PROJ.search(m.path or m.flat or ""))]
        if layers:
            return min(layers, key=lambda t: t[0])[1]
    return min(mods, key=lambda m: m.order)


def _diffusers_scales(mods: list[LoraModule], component: str) -> dict[str, float]:
    ordered = sorted(mods, key=lambda m: m.order)
    alphas = [m.alpha for m in ordered if m.alpha is not None]
    default = (collections.Counter(alphas).most_common(1)[0][0] if alphas
               else float(_first_module(mods, component).rank))
    return {m.name: (m.alpha if m.alpha is not None else default) / m.rank for m in mods}


def _pattern_value(patterns: Mapping[str, float], path: str, default: float) -> float:
    for key, value in patterns.items():  # PEFT: a pattern matches the module name or a dotted suffix of it
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return value
    return default


def _peft_scales(mods: list[LoraModule], cfg: Mapping) -> dict[str, float]:
    out = {}
    for m in mods:
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, m.path, cfg.get("r", 8)))
        if r != m.rank:
            raise LoraError(f"{m.name}: rank {m.rank} in the weights, but the adapter config says r={r}")
        alpha = m.alpha if m.alpha is not None else float(
            _pattern_value(cfg.get("alpha_pattern") or {}, m.path, cfg.get("lora_alpha", 8)))
        out[m.name] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return out


def module_scales(lora: LoraFile, rule: str = "alpha_scaled") -> dict[str, float]:
    """Module name -> scale (multiplier not included) under `rule`, by the rules in this module's docstring."""
    check_rule(rule)
    if rule == "official":
        for m in lora.modules:
            _official_check(m, lora)
        return {m.name: 1.0 for m in lora.modules}
    out: dict[str, float] = {}
    for comp in (UNET, TEXT_ENCODER):
        plain = [m for m in lora.modules if m.component == comp and m.is_plain]
        if plain:
            out.update(_peft_scales(plain, lora.config) if lora.config is not None and lora.format != KOHYA
                       else _diffusers_scales(plain, comp))
    out.update({m.name: _lycoris_scale(m) for m in lora.modules if not m.is_plain})
    return out


# ------------------------------------------------------------------------------------------ deltas

def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """LyCORIS' Tucker rebuild: core (r, r, kh, kw) with mode factors wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return np.einsum("ijkl,ip,jr->prkl", _f32(t), _f32(wa), _f32(wb))


def _matmul2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _f32(a).reshape(a.shape[0], -1) @ _f32(b).reshape(b.shape[0], -1)


def _lokr_factors(p: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    w1 = _f32(p["w1"]) if "w1" in p else _matmul2d(p["w1_a"], p["w1_b"])
    if "w2" in p:
        w2 = _f32(p["w2"])
    elif "t2" in p:
        w2 = _tucker(p["t2"], p["w2_a"], p["w2_b"])
    else:
        w2 = _matmul2d(p["w2_a"], p["w2_b"])
    return w1, w2


def update_size(m: LoraModule) -> tuple[int, int, tuple[int, ...] | None]:
    """(out features, number of elements, full shape where the parts fix it) of the module's update."""
    p = m.parts
    if m.kind == LORA:
        kernel = p["mid"].shape[2:] if "mid" in p else p["down"].shape[2:]
        shape = (int(p["up"].shape[0]), int(p["down"].shape[1]), *map(int, kernel))
        return shape[0], math.prod(shape), shape
    if m.kind == LOHA:
        if "t1" in p:
            shape = (int(p["w1_a"].shape[1]), int(p["w1_b"].shape[1]), *map(int, p["t1"].shape[2:]))
            return shape[0], math.prod(shape), shape
        out = int(p["w1_a"].shape[0])
        return out, out * math.prod(p["w1_b"].shape[1:]), None
    a, c = p["w1"].shape if "w1" in p else (p["w1_a"].shape[0], p["w1_b"].shape[1])
    if "w2" in p:
        w2 = tuple(p["w2"].shape)
    elif "t2" in p:
        w2 = (p["w2_a"].shape[1], p["w2_b"].shape[1], *p["t2"].shape[2:])
    else:
        w2 = (p["w2_a"].shape[0], math.prod(p["w2_b"].shape[1:]))
    return int(a * w2[0]), int(a * c * math.prod(w2)), None


def fits(m: LoraModule, shape: tuple[int, ...]) -> bool:
    out, numel, exact = update_size(m)
    if exact is not None:
        return exact == tuple(shape) or (len(exact) == 4 and exact[2:] == (1, 1) and exact[:2] == tuple(shape))
    return len(shape) >= 2 and out == shape[0] and numel == math.prod(shape)


def module_delta(m: LoraModule, shape: tuple[int, ...]) -> np.ndarray:
    """The unscaled update in float32, in the PyTorch layout `shape` of the target weight (`fits` must hold)."""
    p = m.parts
    if m.kind == LORA:
        up, down = _f32(p["up"]), _f32(p["down"])
        if "mid" in p:  # LoCon-Tucker: 1x1 down, kxk core, 1x1 up
            delta = np.einsum("nmkl,in,mj->ijkl", _f32(p["mid"]), up[:, :, 0, 0], down[:, :, 0, 0])
        elif down.ndim == 2:
            delta = up @ down
        elif down.shape[2:] == (1, 1):
            delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
        else:  # a kxk `down` conv followed by a 1x1 `up` conv is one kxk conv with this kernel
            delta = np.tensordot(up[:, :, 0, 0], down, axes=(1, 0))
    elif m.kind == LOHA:
        w1 = _tucker(p["t1"], p["w1_a"], p["w1_b"]) if "t1" in p else _matmul2d(p["w1_a"], p["w1_b"])
        w2 = _tucker(p["t2"], p["w2_a"], p["w2_b"]) if "t2" in p else _matmul2d(p["w2_a"], p["w2_b"])
        delta = w1.reshape(shape) * w2.reshape(shape)
    else:
        w1, w2 = _lokr_factors(p)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        delta = np.kron(w1, w2)
    return np.ascontiguousarray(delta.reshape(shape), dtype=np.float32)


# ------------------------------------------------------------------------------------------ planning and merging

@dataclasses.dataclass(frozen=True)
class Planned:
    component: str
    key: str            # the target's `.weight` key (PyTorch name)
    module: LoraModule
    scale: float        # multiplier * module scale


def module_index(keys) -> dict[str, list[str]]:
    """kohya-style name (module path with `.` -> `_`) -> module paths having a `.weight` in `keys`."""
    index: dict[str, list[str]] = {}
    for key in keys:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            index.setdefault(module.replace(".", "_"), []).append(module)
    return index


def plan_merge(lora: LoraFile, shapes: Mapping[str, Mapping[str, tuple[int, ...]] | None], *,
               multiplier: float = 1.0, rule: str = "alpha_scaled") -> tuple[list[Planned], list[str]]:
    """Resolve every module to exactly one target weight of a fitting shape, or raise naming each that does not.

    `shapes`: component -> {PyTorch key: shape}; a component mapped to None was not given, and its modules are
    returned as skipped (reported by the callers, never merged).
    """
    scales = module_scales(lora, rule)
    indexes = {c: module_index(s) for c, s in shapes.items() if s is not None}
    plan, skipped, problems, seen = [], [], [], {}
    for m in lora.modules:
        target = shapes.get(m.component)
        if target is None:
            skipped.append(m.name)
            continue
        if m.path is not None:
            found = [m.path] if m.path + ".weight" in target else []
        else:
            found = indexes[m.component].get(m.flat, [])
        if len(found) != 1:
            problems.append(f"{m.name}: " + (f"matches several {m.component} modules {found}" if found else
                                             f"no such module in the {m.component}"))
            continue
        key = found[0] + ".weight"
        if not fits(m, target[key]):
            got = update_size(m)
            problems.append(f"{m.name}: the LoRA makes a {list(got[2]) if got[2] else f'{got[0]}-row'} update, "
                            f"{m.component} `{key}` is {list(target[key])}")
            continue
        if (m.component, key) in seen:
            problems.append(f"{m.name}: targets {m.component} `{key}` like {seen[(m.component, key)]}")
            continue
        seen[(m.component, key)] = m.name
        plan.append(Planned(m.component, key, m, float(multiplier) * scales[m.name]))
    if problems:
        raise LoraError(f"{lora.what} does not fit this SD1.x model ({len(problems)} of {len(lora.modules)} modules): "
                        f"{listed(problems)}. Expected a LoRA trained on this SD1.x architecture")
    return plan, skipped


def apply_plan(plan: Sequence[Planned], weights: dict[str, dict[str, np.ndarray]]) -> None:
    """`W += float32(scale) * delta` in float32 for each planned module, in order (replaces dict entries)."""
    for step in plan:
        w = np.asarray(weights[step.component][step.key], dtype=np.float32)
        delta = module_delta(step.module, w.shape) * np.float32(step.scale)
        weights[step.component][step.key] = w + delta
