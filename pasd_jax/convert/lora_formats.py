"""Reading SD1.x LoRA files of every common format into one list of per-module updates.

Users bring LoRAs from kohya `sd-scripts` / civitai, from diffusers training scripts, from bare PEFT adapters and
from LyCORIS. They differ only in how a module is named and which tensors describe its update:

- kohya (`lora_unet_<path with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te_...` for CLIP):
  the names are ambiguous (`to_out_0`), so they are resolved later against the target's module paths. LyCORIS
  writes the same names with other parts: LoCon-Tucker `lora_mid`, LoHa `hada_w{1,2}_{a,b}` (+ `hada_t{1,2}`),
  LoKr `lokr_w{1,2}` or `lokr_w{1,2}_{a,b}` (+ `lokr_t2`).
- diffusers (`unet.<path>.lora.down.weight`, `unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_linear_layer
  .down.weight`, attention-processor files `<...>.processor.to_q_lora.down.weight`, with or without `unet.`).
- PEFT (`base_model.model.<path>.lora_A.weight` + `adapter_config.json` beside the weights).

Exact names (diffusers / PEFT) give the PyTorch module path directly. DoRA, OFT, IA3, GLoRA and full-diff modules
are refused with the key that shows them, never skipped. How each format scales its update is in `lora_fuse`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from pasd_jax.convert.family import ModelFamilyError, check_sd1
from pasd_jax.convert.io import PathLike, WeightFileError, load_weights, safetensors_metadata

UNET, TEXT_ENCODER = "unet", "text_encoder"
KOHYA, DIFFUSERS, PEFT = "kohya", "diffusers", "peft"
LORA, LOHA, LOKR = "lora", "loha", "lokr"
UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te_"
ADAPTER_CONFIG = "adapter_config.json"
# what a folder given as a LoRA may hold, in diffusers' order of preference
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                "adapter_model.bin")
_MAX_LISTED = 20

# kohya / LyCORIS part name -> (module kind, part)
_KOHYA_PARTS = {
    "lora_down.weight": (LORA, "down"), "lora_up.weight": (LORA, "up"), "lora_mid.weight": (LORA, "mid"),
    **{f"hada_{p}": (LOHA, p) for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{p}": (LOKR, p) for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
_REQUIRED = {LORA: [("down", "up")], LOHA: [("w1_a", "w1_b", "w2_a", "w2_b")],
             LOKR: [("w1",), ("w1_a", "w1_b")]}  # LoKr also needs one of w2 / (w2_a, w2_b), checked below
_UNSUPPORTED = {"dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
                "oft_blocks": "OFT", "oft_diag": "OFT", "diff": "a LyCORIS full-weight diff", "diff_b": "a LyCORIS "
                "full-weight diff", "on_input": "IA3", "a1.weight": "GLoRA", "b1.weight": "GLoRA"}

# diffusers / PEFT key suffixes -> part; the module path is what precedes them
_EXACT_SUFFIXES = [(re.compile(r"^(.*)\.lora_A\.weight$"), "down"), (re.compile(r"^(.*)\.lora_B\.weight$"), "up"),
                   (re.compile(r"^(.*)\.lora\.down\.weight$"), "down"), (re.compile(r"^(.*)\.lora\.up\.weight$"), "up"),
                   (re.compile(r"^(.*)\.lora_linear_layer\.down\.weight$"), "down"),
                   (re.compile(r"^(.*)\.lora_linear_layer\.up\.weight$"), "up"),
                   (re.compile(r"^(.*)\.alpha$"), "alpha")]
_PROCESSOR = re.compile(r"^(.*)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_CHILD = {UNET: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    TEXT_ENCODER: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "conv_norm_out")


class LoraError(ValueError):
    """A LoRA file that is malformed, of an unsupported variant, or made for another architecture."""


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One module's update as the file describes it (tensors as stored, usually float16)."""
    name: str                        # the key stem in the file, e.g. lora_unet_down_blocks_0_..., unet.down_blocks...
    component: str                   # UNET or TEXT_ENCODER
    kind: str                        # LORA, LOHA or LOKR
    parts: Mapping[str, np.ndarray]  # LORA: down, up (, mid); LOHA: w1_a ... (, t1, t2); LOKR: w1 | w1_a, w1_b ...
    alpha: float | None              # None when the file has no alpha for it (0 counts as none, as in kohya)
    order: int                       # position of its rank-giving key in the file (diffusers' first-key rule)
    path: str | None = None          # exact PyTorch module path (diffusers / PEFT names)
    flat: str | None = None          # kohya name without its prefix (the module path with '.' -> '_'), resolved later

    @property
    def rank(self) -> int:
        p = self.parts
        if self.kind == LORA:
            return int(p["down"].shape[0])
        if self.kind == LOHA:
            return int(p["w1_b"].shape[0])
        b = p.get("w2_b", p.get("w1_b"))
        return int(b.shape[0]) if b is not None else 0  # 0: both LoKr factors full, no rank

    @property
    def is_plain(self) -> bool:
        """A LoRA PASD's and diffusers' merges know: up @ down, no Tucker core."""
        return self.kind == LORA and "mid" not in self.parts


@dataclasses.dataclass(frozen=True)
class LoraFile:
    what: str                                  # the file (or a description) for messages
    format: str                                # KOHYA, DIFFUSERS or PEFT
    modules: tuple[LoraModule, ...]
    config: Mapping[str, Any] | None = None    # PEFT adapter config (lora_alpha, r, patterns, use_rslora)
    sources: tuple[str, ...] = ()              # the files read (weights, adapter config), for cache keys


def listed(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


def _alpha(value: np.ndarray) -> float | None:
    a = float(np.asarray(value, dtype=np.float64).reshape(()))
    return a if a != 0 else None


def _check_parts(name: str, kind: str, parts: Mapping[str, np.ndarray], bad: list[str]) -> bool:
    if not any(all(r in parts for r in req) for req in _REQUIRED[kind]) or (
            kind == LOKR and "w2" not in parts and not ("w2_a" in parts and "w2_b" in parts)):
        bad.append(f"{name}: an incomplete {kind} module (has {sorted(parts)})")
        return False
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(parts.items()))
    if kind != LORA:
        if not all(_factors_ok(parts, i) for i in ("1", "2") if f"w{i}_a" in parts):
            bad.append(f"{name}: {shapes} do not form a {kind} module (factor shapes do not chain)")
            return False
        return True
    down, up = parts["down"], parts["up"]
    conv_up = up.ndim == 4 and up.shape[2:] == (1, 1)
    ok = ((down.ndim == 2 and up.ndim == 2) or (down.ndim == 4 and conv_up)) and up.shape[1] == down.shape[0]
    if ok and "mid" in parts:  # Tucker core (r_up, r_down, kh, kw) between a 1x1 down and a 1x1 up
        mid = parts["mid"]
        ok = down.shape[2:] == (1, 1) and mid.ndim == 4 and mid.shape[:2] == (up.shape[1], down.shape[0])
    if not ok:
        bad.append(f"{name}: {shapes} do not form a rank-r Linear or Conv2d LoRA")
    return ok


def _factors_ok(parts: Mapping[str, np.ndarray], i: str) -> bool:
    """LyCORIS factor pair `w{i}_a`, `w{i}_b` (and Tucker core `t{i}`): plain a (out, r) @ b (r, ...), or with a
    core t (r, r, kh, kw) and mode factors a (r, out), b (r, in)."""
    a, b, t = parts[f"w{i}_a"], parts.get(f"w{i}_b"), parts.get(f"t{i}")
    if b is None or a.ndim != 2 or b.ndim < 2:
        return False
    if t is not None:
        return t.ndim == 4 and b.ndim == 2 and t.shape[:2] == (a.shape[0], b.shape[0])
    return a.shape[1] == b.shape[0]


def _unsupported(key: str) -> str | None:
    for part, what in _UNSUPPORTED.items():
        if key.endswith("." + part) or f".{part}." in key:
            return f"{key} ({what} is not supported; merge it with its own tool into a plain LoRA or full model)"
    return None


# ------------------------------------------------------------------------------------------ kohya / LyCORIS

def parse_kohya(state: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None,
                what: str = "LoRA") -> LoraFile:
    """kohya / LyCORIS names; raise `LoraError` / `ModelFamilyError` for anything else."""
    check_sd1(state, what=what, metadata=metadata)
    grouped: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for i, (key, value) in enumerate(state.items()):
        name, _, part = key.partition(".")
        if not name.startswith((UNET_PREFIX, TEXT_PREFIX)):
            bad.append(f"{key} (expected names starting with {UNET_PREFIX} or {TEXT_PREFIX})")
            continue
        g = grouped.setdefault(name, {"parts": {}, "kinds": set(), "alpha": None, "order": None})
        if part == "alpha":
            g["alpha"] = _alpha(value)
        elif part in _KOHYA_PARTS:
            kind, p = _KOHYA_PARTS[part]
            g["kinds"].add(kind)
            g["parts"][p] = value
            if g["order"] is None and p in ("down", "w1_b", "w2_b", "w1", "w1_a"):
                g["order"] = i  # diffusers walks the `lora_down` keys in file order
        else:
            bad.append(_unsupported(key) or f"{key} (a LoRA part this reader does not know; supported: LoRA "
                       "lora_down/lora_up/lora_mid, LoHa hada_*, LoKr lokr_*, alpha)")
    modules = []
    for name, g in grouped.items():
        if not g["kinds"]:
            bad.append(f"{name}: only an alpha, no weights")
            continue
        if len(g["kinds"]) > 1:
            bad.append(f"{name}: mixes parts of {sorted(g['kinds'])}")
            continue
        kind = g["kinds"].pop()
        if not _check_parts(name, kind, g["parts"], bad):
            continue
        comp = UNET if name.startswith(UNET_PREFIX) else TEXT_ENCODER
        prefix = UNET_PREFIX if comp == UNET else TEXT_PREFIX
        modules.append(LoraModule(name, comp, kind, g["parts"], g["alpha"], g["order"] or 0,
                                  flat=name[len(prefix):]))
    if bad:
        raise LoraError(f"{what}: {len(bad)} problem(s): {listed(bad)}")
    return LoraFile(what, KOHYA, tuple(modules))


# ------------------------------------------------------------------------------------------ diffusers / PEFT

def _component_of(key: str, peft_raw: bool) -> tuple[str | None, str]:
    """(component, key without its component prefix)."""
    if peft_raw:
        rest = key[len("base_model.model."):]
        return (TEXT_ENCODER if rest.startswith("text_model.") else UNET), rest
    for prefix, comp in (("unet.", UNET), ("text_encoder.", TEXT_ENCODER)):
        if key.startswith(prefix):
            return comp, key[len(prefix):]
    return (UNET if key.startswith(_UNET_ROOTS) else None), key


def _exact_key(rest: str, comp: str) -> tuple[str, str] | None:
    """(module path, part) of a diffusers / PEFT key, or None."""
    m = _PROCESSOR.match(rest)
    if m:
        parent = m.group(1).replace(".processor", "")
        return f"{parent}.{_PROCESSOR_CHILD[comp][m.group(2)]}", m.group(3)
    for rx, part in _EXACT_SUFFIXES:
        m = rx.match(rest)
        if m:
            return m.group(1).replace(".processor.", "."), part
    return None


def _check_exact_family(state: Mapping[str, np.ndarray], what: str) -> None:
    keys = list(state)
    for marker, fam in (("text_encoder_2.", "SDXL (a second text encoder)"), ("add_embedding.", "SDXL"),
                        ("transformer.", "an SD3 / Flux transformer")):
        hit = next((k for k in keys if k.startswith(marker) or f".{marker}" in k), None)
        if hit:
            raise ModelFamilyError(f"{what}: this looks like a LoRA for {fam} (`{hit}`); pasd-jax expected a LoRA "
                                   "for Stable Diffusion 1.x")
    for k in keys:
        if re.search(r"attn2\.(processor\.)?to_k(_lora)?\.(lora_A|lora\.down|down)", k) and state[k].ndim == 2:
            dim = int(state[k].shape[1])
            fam = {1024: "Stable Diffusion 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}.get(dim)
            if fam:
                raise ModelFamilyError(f"{what}: this looks like a LoRA for {fam} (cross-attention dim {dim}: `{k}` "
                                       f"has shape {list(state[k].shape)}); pasd-jax expected a LoRA for Stable "
                                       "Diffusion 1.x (cross-attention dim 768 for SD1.5)")
            break


def parse_exact(state: Mapping[str, np.ndarray], *, config: Mapping[str, Any] | None = None,
                what: str = "LoRA") -> LoraFile:
    """diffusers / PEFT names (module paths spelled out)."""
    _check_exact_family(state, what)
    peft_raw = any(k.startswith("base_model.model.") for k in state)
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    bad: list[str] = []
    for i, (key, value) in enumerate(state.items()):
        if peft_raw and not key.startswith("base_model.model."):
            bad.append(f"{key} (a PEFT adapter file should only hold base_model.model.* keys)")
            continue
        comp, rest = _component_of(key, peft_raw)
        got = _exact_key(rest, comp or UNET) if comp else None
        if got is None:
            bad.append(_unsupported(key) or f"{key} (not a LoRA key of the SD1.x UNet or text encoder: expected "
                       "unet.<module>.lora_A.weight / .lora.down.weight, text_encoder.<module>.lora_linear_layer"
                       ".down.weight, base_model.model.<module>.lora_A.weight or <module>.alpha)")
            continue
        path, part = got
        g = grouped.setdefault((comp, path), {"parts": {}, "alpha": None, "order": None,
                                              "name": key[:len(key) - len(rest)] + path})
        if part == "alpha":
            g["alpha"] = _alpha(value)
            continue
        if part in g["parts"]:
            bad.append(f"{key}: a second {part} tensor for {comp} module {path}")
        g["parts"][part] = value
        if part == "up" and g["order"] is None:
            g["order"] = i  # diffusers reads the rank from the lora_B keys, in file order
    modules = []
    for (comp, path), g in grouped.items():
        name = g["name"]
        if not g["parts"]:
            bad.append(f"{name}: only an alpha, no weights")
        elif _check_parts(name, LORA, g["parts"], bad):
            modules.append(LoraModule(name, comp, LORA, g["parts"], g["alpha"], g["order"] or 0, path=path))
    if bad:
        raise LoraError(f"{what}: {len(bad)} problem(s): {listed(bad)}")
    return LoraFile(what, PEFT if peft_raw else DIFFUSERS, tuple(modules), config)


# ------------------------------------------------------------------------------------------ files

def is_kohya_state(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te")) for k in state)


def parse_lora(state: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None,
               config: Mapping[str, Any] | None = None, what: str = "LoRA") -> LoraFile:
    """Any supported format, told from the key names."""
    if not state:
        raise LoraError(f"{what}: holds no tensors")
    if is_kohya_state(state):
        return parse_kohya(state, metadata=metadata, what=what)
    return parse_exact(state, config=config, what=what)


def read_adapter_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{path}: unreadable PEFT adapter config ({e})") from e
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraError(f"{path}: a PEFT {peft_type} adapter; only LoRA adapters (peft_type LORA) are supported")
    if cfg.get("use_dora"):
        raise LoraError(f"{path}: a DoRA adapter (use_dora true) is not supported")
    return cfg


def resolve_lora_path(source: PathLike) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(weights file, adapter_config.json beside it or None); a folder is searched like diffusers does."""
    src = pathlib.Path(source)
    if src.is_dir():
        found = [src / n for n in FOLDER_FILES if (src / n).is_file()]
        if not found:
            for ext in (".safetensors", ".bin"):
                found = sorted(p for p in src.glob(f"*{ext}") if p.is_file())
                if found:
                    break
            if len(found) > 1:
                raise WeightFileError(f"LoRA folder {src} holds several weight files ({', '.join(p.name for p in found)}"
                                      "): give the file itself")
        if not found:
            raise WeightFileError(f"LoRA folder {src} has no weight file: expected {FOLDER_FILES[0]} (diffusers), "
                                  f"{FOLDER_FILES[1]} (PEFT) or a single .safetensors file")
        src = found[0]
    elif not src.is_file():
        raise WeightFileError(f"LoRA {src} does not exist")
    cfg = src.parent / ADAPTER_CONFIG
    return src, (cfg if cfg.is_file() else None)


def read_lora(source: PathLike) -> LoraFile:
    """A LoRA file or folder. safetensors keys are taken in sorted order, the order diffusers sees them in."""
    weights, config_path = resolve_lora_path(source)
    state = load_weights(weights)
    metadata = {}
    if weights.suffix == ".safetensors":
        state = {k: state[k] for k in sorted(state)}
        metadata = safetensors_metadata(weights)
    config = None
    if config_path is not None and not is_kohya_state(state):
        config = read_adapter_config(config_path)
    parsed = parse_lora(state, metadata=metadata, config=config, what=str(weights))
    used = (weights,) if config is None else (weights, config_path)
    return dataclasses.replace(parsed, sources=tuple(str(p.resolve()) for p in used))
