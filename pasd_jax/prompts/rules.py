"""PASD's prompt text rules (official `test_pasd.py`, spec 4.3), as pure string functions.

Kept apart from the models so each rule is tested against hand-written strings with fake model outputs, and so that
a cached model output can be re-rendered with another `--prompt` / `--added-prompt` without running a model again.
The official quirks are kept on purpose (the prompt text changes what the sampler produces):
- the added prompt is glued on **without** a separator (`"a dog clean, ..."`, `"...grassclean, ..."` for BLIP);
  `join_added_prompt(..., separator=True)` is the opt-in fix;
- caption word replacements are plain substring replacements ("blurry" -> "clear", then "noisy" -> "clean");
- a CoCa caption keeps whatever whitespace open_clip's decoding leaves before `<end_of_text>`.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

CLASSIFICATION_THRESHOLD = 0.1
DEFAULT_ADDED_PROMPT = "clean, high-resolution, 8k"  # test_pasd.py --added_prompt default
DEFAULT_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
GRAYSCALE_NEGATIVE_PROMPT = "b&w, color bleeding"
CAPTION_STYLES = ("coca", "blip")
CONTROL_TYPES = ("realisr", "grayscale")
# Colorization (official grayscale mode): a caption of the gray input says "black and white"; asking for that
# would ask the model for a gray image. Plain, case-sensitive substring replacement, as the official code does.
COLOR_REPLACEMENTS = (("black and white", "color"),)


def none_text(prompt: str) -> str:
    """No high-level model: `""`, or `"<prompt>, "` when the user gave one."""
    return "" if prompt == "" else f"{prompt}, "


def classification_text(category: str, score: float, prompt: str,
                        threshold: float = CLASSIFICATION_THRESHOLD) -> str:
    """Top-1 ImageNet class: `"<category>, "` (after `"<prompt>, "`) when its softmax score is >= threshold, else `""`.

    Below the threshold the user prompt is dropped too, exactly as the official code does.
    """
    if score < threshold:
        return ""
    return f"{category}, " if prompt == "" else f"{prompt}, {category}, "


def detection_text(names: Iterable[str], prompt: str) -> str:
    """Per-class box counts `"<count> <name>, "` in order of first appearance, after `"<prompt>, "` if given.

    With no detection and a user prompt this gives `"<prompt>, "` (the official f-string with an empty list).
    """
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    dets = "".join(f"{n} {name}, " for name, n in counts.items())
    return dets if prompt == "" else f"{prompt}, {dets}"


def clean_caption(raw: str, style: str) -> str:
    """A captioner's raw output -> caption: CoCa's special tokens stripped, then the word replacements.

    CoCa (`open_clip.decode`) output is cut at `<end_of_text>` and `<start_of_text>` removed; BLIP's text is used
    as is. Both then get "blurry" -> "clear" and "noisy" -> "clean", which keep the caption from asking the
    diffusion model for a degraded image.
    """
    if style not in CAPTION_STYLES:
        raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")
    if style == "coca":
        raw = raw.split("<end_of_text>")[0].replace("<start_of_text>", "")
    return raw.replace("blurry", "clear").replace("noisy", "clean")


def caption_text(caption: str, prompt: str, style: str) -> str:
    """A cleaned caption joined with the user prompt: CoCa `"<caption> <prompt>"`, BLIP `"<caption>, <prompt>"`."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")
    if prompt == "":
        return caption
    return f"{caption} {prompt}" if style == "coca" else f"{caption}, {prompt}"


def captions_file_text(text: str, prompt: str) -> str:
    """A caption from a `--captions` file: used verbatim (it was chosen by the user), BLIP-style join with a prompt."""
    return text if prompt == "" else f"{text}, {prompt}"


def join_added_prompt(text: str, added_prompt: str, separator: bool = False) -> str:
    """Append `added_prompt`: glued as the official code does, or with `", "` when `separator` is set.

    With `separator`, trailing spaces and a trailing comma of `text` are folded into the one `", "`, and an empty
    `text` takes no separator at all.
    """
    if not separator or added_prompt == "":
        return text + added_prompt
    head = text.rstrip().rstrip(",").rstrip()
    return f"{head}, {added_prompt}" if head else added_prompt


def color_text(text: str) -> str:
    """The colorization rule on the high-level text: "black and white" -> "color" (case-sensitive, as official)."""
    for old, new in COLOR_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def final_prompt(text: str, added_prompt: str, control_type: str = "realisr", separator: bool = False) -> str:
    """The positive prompt from the high-level text, per control type.

    realisr appends `added_prompt`; grayscale (colorization) replaces "black and white" with "color" and uses no
    added prompt (its negative prompt is `GRAYSCALE_NEGATIVE_PROMPT`, see `negative_prompt_for`).
    """
    if control_type == "realisr":
        return join_added_prompt(text, added_prompt, separator)
    if control_type == "grayscale":
        return color_text(text)
    raise ValueError(f"control_type must be one of {CONTROL_TYPES}, got {control_type!r}")


def negative_prompt_for(control_type: str, negative_prompt: str) -> str:
    """The official negative prompt: the user's for realisr, fixed `"b&w, color bleeding"` for grayscale."""
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"control_type must be one of {CONTROL_TYPES}, got {control_type!r}")
    return negative_prompt if control_type == "realisr" else GRAYSCALE_NEGATIVE_PROMPT


def names_from_class_ids(class_ids: Sequence[float | int], names: Mapping[int, str] | Sequence[str]) -> list[str]:
    """Detector class ids (ultralytics returns floats) -> class names, in box order."""
    return [names[int(c)] for c in class_ids]
