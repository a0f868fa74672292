"""Which Stable Diffusion family a weight dict belongs to, told from key names and a few shapes.

PASD is built on SD1.x. Users download civitai files, diffusers folders and LoRAs without knowing which base they
were made for; loading an SDXL or SD2 file into the SD1.x layout would either fail deep inside the key mapping with a
list of hundreds of unknown keys, or, for a LoRA, silently resolve nothing. Checking the family first turns that into
one sentence that names what was found and what was expected.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from pasd_jax.errors import WeightFileError

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "cond_stage_model.transformer."
LDM_OPENCLIP = "cond_stage_model.model."
SGM_CONDITIONER = "conditioner.embedders."

EXPECTED = {
    "ldm": "a Stable Diffusion 1.x single file (CLIP text encoder at `cond_stage_model.transformer.*`, UNet "
           "cross-attention dim = text width, 768 for SD1.5, and 4 UNet input channels)",
    "diffusers_unet": "a Stable Diffusion 1.x UNet (cross-attention dim 768 for SD1.5, 4 input channels, "
                      "no added/class embedding)",
    "kohya_lora": "a kohya LoRA for Stable Diffusion 1.x (`lora_unet_down_blocks_...` / `lora_te_text_model_...` "
                  "names, cross-attention dim 768 for SD1.5)",
}
_EXPECTED_ANY = ("Stable Diffusion 1.x weights: an original-LDM single file, a diffusers UNet state dict or a "
                 "kohya LoRA")
_SD2_NOTE = ("SD2.x 768-v (v-prediction) and SD2.x 512-base have identical weight layouts, so which one this is "
             "cannot be told from the weights")

# cross-attention width -> family, for widths that are never SD1.x
_CROSS_DIM_FAMILY = {1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
_IN_CHANNEL_VARIANT = {9: "inpainting", 8: "InstructPix2Pix-style (8 input channels)"}


class ModelFamilyError(WeightFileError):
    """The weights belong to another model family (or a variant) than the SD1.x that PASD needs."""


@dataclasses.dataclass(frozen=True)
class Family:
    name: str       # "sd1", "sd2", "sdxl", "sdxl_refiner", "sd1_variant", "unknown"
    layout: str     # "ldm", "diffusers_unet", "kohya_lora", "peft_lora", "unknown"
    evidence: str   # what in the weights led to the verdict, for messages

    @property
    def is_sd1(self) -> bool:
        return self.name == "sd1"


def _first(state: Mapping[str, Any], pattern: str) -> tuple[str, Any] | None:
    rx = re.compile(pattern)
    for k, v in state.items():
        if rx.search(k):
            return k, v
    return None


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(getattr(v, "shape", ()))


def detect_layout(state: Mapping[str, Any]) -> str:
    """The key layout: original LDM single file, diffusers UNet state dict, kohya LoRA or PEFT/diffusers LoRA."""
    keys = list(state)
    if any(k.startswith((LDM_UNET, LDM_VAE, "cond_stage_model.", SGM_CONDITIONER)) for k in keys):
        return "ldm"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".hada_w" in k or ".lokr_w" in k
           for k in keys):
        return "kohya_lora"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "peft_lora"
    if "conv_in.weight" in state and any(k.startswith("down_blocks.") for k in keys):
        return "diffusers_unet"
    return "unknown"


def detect_family(state: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Family:
    """Tell the family of an LDM single file, a diffusers UNet dict or a LoRA (values need only a `.shape`)."""
    layout = detect_layout(state)
    if layout == "ldm":
        return _ldm_family(state)
    if layout == "diffusers_unet":
        return _diffusers_unet_family(state)
    if layout == "kohya_lora":
        return _kohya_family(state, metadata or {})
    if layout == "peft_lora":
        return Family("unknown", layout, "a diffusers/PEFT-format LoRA (`lora_A`/`lora_B` or `lora.down` keys)")
    some = ", ".join(sorted(state)[:5]) or "no keys at all"
    return Family("unknown", layout, f"no known Stable Diffusion key layout (first keys: {some})")


def _cross_attention(found: tuple[str, Any] | None, where: str) -> tuple[str, str] | None:
    """(family, evidence) from the width of the first cross-attention key projection, if it rules out SD1.x."""
    if found is None:
        return None
    k, v = found
    shape = _shape(v)
    if len(shape) < 2:
        return None
    dim = shape[1]
    fam = _CROSS_DIM_FAMILY.get(dim)
    if fam is None:
        return None
    where = f"{where} " if where else ""
    return fam, f"cross-attention dim {dim} ({where}`{k}` has shape {list(shape)})"


def _ldm_family(state: Mapping[str, Any]) -> Family:
    keys = list(state)
    if any(k.startswith(SGM_CONDITIONER) for k in keys) or any(k.startswith(LDM_UNET + "label_emb.") for k in keys):
        which = "sdxl"
        if not any(k.startswith(SGM_CONDITIONER + "1.") for k in keys) and any(
                k.startswith(SGM_CONDITIONER + "0.model.") for k in keys):
            which = "sdxl_refiner"
        cross = _cross_attention(_first(state, r"^model\.diffusion_model\..*attn2\.to_k\.weight$"), "")
        extra = f"; {cross[1]}" if cross else ""
        return Family(which, "ldm", "SDXL-style keys (`conditioner.embedders.*` / `model.diffusion_model.label_emb.*`)"
                      + extra)
    if any(k.startswith(LDM_OPENCLIP) for k in keys):
        cross = _cross_attention(_first(state, r"^model\.diffusion_model\..*attn2\.to_k\.weight$"), "")
        extra = f", {cross[1]}" if cross else ""
        return Family("sd2", "ldm", f"an OpenCLIP text encoder (`{LDM_OPENCLIP}*`){extra}; {_SD2_NOTE}")
    if not any(k.startswith(LDM_UNET) for k in keys):
        parts = sorted({k.split(".")[0] for k in keys})
        return Family("unknown", "ldm", f"no UNet (`{LDM_UNET}*`) in the file; top-level prefixes: {parts}")
    conv_in = state.get(LDM_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        mods = sorted({k[len(LDM_UNET):].split(".")[0] for k in keys if k.startswith(LDM_UNET)})[:8]
        return Family("unknown", "ldm", f"a diffusion model that is not an SD UNet (`{LDM_UNET}` modules: {mods}); "
                      "SD3/Flux-style transformers are not supported")
    cross = _cross_attention(_first(state, r"^model\.diffusion_model\..*attn2\.to_k\.weight$"), "UNet")
    if cross:
        note = f"; {_SD2_NOTE}" if cross[0] == "sd2" else ""
        return Family(cross[0], "ldm", cross[1] + note)
    variant = _in_channels_variant(_shape(conv_in), LDM_UNET + "input_blocks.0.0.weight")
    if variant:
        return Family("sd1_variant", "ldm", variant)
    te_width = _first(state, r"^cond_stage_model\.transformer\.(text_model\.)?embeddings\.token_embedding\.weight$")
    unet_cross = _first(state, r"^model\.diffusion_model\..*attn2\.to_k\.weight$")
    if te_width and unet_cross and _shape(te_width[1])[1:2] != _shape(unet_cross[1])[1:2]:
        return Family("unknown", "ldm", f"text width {_shape(te_width[1])[1]} (`{te_width[0]}`) differs from the "
                      f"UNet cross-attention dim {_shape(unet_cross[1])[1]} (`{unet_cross[0]}`)")
    return Family("sd1", "ldm", "SD1.x LDM keys")


def _in_channels_variant(shape: tuple[int, ...], key: str) -> str | None:
    if len(shape) == 4 and shape[1] != 4:
        what = _IN_CHANNEL_VARIANT.get(shape[1], f"{shape[1]} input channels")
        return f"an SD1.x {what} UNet: `{key}` has shape {list(shape)}, expected 4 input channels"
    return None


def _diffusers_unet_family(state: Mapping[str, Any]) -> Family:
    if any(k.startswith("add_embedding.") for k in state):
        return Family("sdxl", "diffusers_unet", "SDXL-style added-condition embedding (`add_embedding.*`)")
    if any(k.startswith("class_embedding.") for k in state):
        return Family("unknown", "diffusers_unet", "a class-conditioned UNet (`class_embedding.*`, e.g. the SD x4 "
                      "upscaler or unCLIP)")
    cross = _cross_attention(_first(state, r"attn2\.to_k\.weight$"), "UNet")
    if cross:
        note = f"; {_SD2_NOTE}" if cross[0] == "sd2" else ""
        return Family(cross[0], "diffusers_unet", cross[1] + note)
    variant = _in_channels_variant(_shape(state["conv_in.weight"]), "conv_in.weight")
    if variant:
        return Family("sd1_variant", "diffusers_unet", variant)
    return Family("sd1", "diffusers_unet", "SD1.x diffusers UNet keys")


def _kohya_family(state: Mapping[str, Any], metadata: Mapping[str, str]) -> Family:
    keys = list(state)
    te12 = [k for k in keys if k.startswith(("lora_te1_", "lora_te2_"))]
    if te12:
        return Family("sdxl", "kohya_lora", f"SDXL-style text-encoder names (`{te12[0]}`: two text encoders)")
    sgm = [k for k in keys if k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_",
                                             "lora_unet_middle_block_"))]
    if sgm:
        return Family("sdxl", "kohya_lora", f"SDXL-style (original-UNet) module names (`{sgm[0]}`); kohya SD1.x "
                      "LoRAs use diffusers names such as `lora_unet_down_blocks_0_attentions_0_...`")
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl") or metadata.get("ss_v2", "").lower() == "true" or base.startswith("sd_v2"):
        fam = "sdxl" if base.startswith("sdxl") else "sd2"
        return Family(fam, "kohya_lora", f"metadata ss_base_model_version={base!r}, ss_v2={metadata.get('ss_v2')!r}")
    cross = _cross_attention(_first(state, r"^lora_unet_.*attn2_to_k\.lora_down\.weight$"), "LoRA")
    if cross:
        note = f"; {_SD2_NOTE}" if cross[0] == "sd2" else ""
        return Family(cross[0], "kohya_lora", cross[1] + note)
    te = _first(state, r"^lora_te_.*self_attn_q_proj\.lora_down\.weight$")
    if te and _shape(te[1])[1:2] == (1024,):
        return Family("sd2", "kohya_lora", f"text-encoder width 1024 (`{te[0]}` has shape {list(_shape(te[1]))}: "
                      f"OpenCLIP ViT-H); {_SD2_NOTE}")
    return Family("sd1", "kohya_lora", "kohya SD1.x LoRA names")


_FAMILY_NAMES = {"sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "sdxl_refiner": "the SDXL refiner",
                 "sd1_variant": "an SD1.x variant", "unknown": "an unsupported model"}


def check_sd1(state: Mapping[str, Any], *, what: str = "weights",
              metadata: Mapping[str, str] | None = None) -> Family:
    """Return the family if it is SD1.x; otherwise raise `ModelFamilyError` saying what was found and expected."""
    fam = detect_family(state, metadata)
    if fam.is_sd1:
        return fam
    raise ModelFamilyError(f"{what}: this looks like {_FAMILY_NAMES.get(fam.name, fam.name)} ({fam.evidence}); "
                           f"pasd-jax expected {EXPECTED.get(fam.layout, _EXPECTED_ANY)}")
