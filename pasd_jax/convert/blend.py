"""PASD's personalized-model blending, `alpha * new + (1 - alpha) * current`, over the keys the new model has.

Swapping a personalized SD1.x base into a trained PASD UNet must replace only the SD base tensors and keep the PACA
layers, which a personalized model does not have. The official folder swap rebuilds the UNet and re-randomises PACA
(spec appendix A8); blending by key over PyTorch-named dicts keeps them by construction, and PACA keys are never
touched even if the new dict happens to contain them.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from pasd_jax.errors import WeightFileError

# name parts of PASD-only modules: `pasd` (PACA) and `pasd_light` additions
PACA_MARKERS = (".pixel_attentions.", ".attn2_plus.", ".norm2_plus.", ".proj_in_plus.")


class BlendError(WeightFileError):
    """The personalized weights do not fit the model they are blended into."""


def is_paca_key(key: str) -> bool:
    return any(m in key for m in PACA_MARKERS)


def blend_weights(current: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], alpha: float = 1.0, *,
                  keys: Iterable[str] | None = None, what: str = "personalized model") -> tuple[dict, list[str]]:
    """Blend `new` into a copy of `current` for `keys` (default: every non-PACA key of `new`).

    Returns (blended dict, keys replaced). Values are computed in float32 and cast to the current dtype; with
    alpha == 1 the new tensor is taken as is (bit for bit), with alpha == 0 nothing changes. Raises `BlendError` if a
    key is absent from `current` or a shape differs, before anything is changed.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blending alpha must be in [0, 1], got {alpha}")
    chosen = [k for k in (new if keys is None else keys) if not is_paca_key(k)]
    absent = [k for k in chosen if k not in current]
    unknown = [k for k in chosen if k not in new]
    mismatched = [f"{k}: {list(new[k].shape)} vs model {list(current[k].shape)}" for k in chosen
                  if k in current and k in new and tuple(new[k].shape) != tuple(current[k].shape)]
    if absent or unknown or mismatched:
        parts = []
        if absent:
            parts.append(f"{len(absent)} key(s) the model does not have: {', '.join(absent[:20])}")
        if unknown:
            parts.append(f"{len(unknown)} requested key(s) missing from the {what}: {', '.join(unknown[:20])}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:20])}")
        raise BlendError(f"{what} does not fit the model ({' | '.join(parts)}); expected weights of the same "
                         "SD1.x architecture")
    out = dict(current)
    for k in chosen:
        cur = current[k]
        if alpha == 1.0:
            out[k] = np.asarray(new[k]).astype(cur.dtype, copy=False)
        elif alpha != 0.0:
            mixed = np.float32(alpha) * new[k].astype(np.float32) + np.float32(1.0 - alpha) * cur.astype(np.float32)
            out[k] = mixed.astype(cur.dtype)
    return out, (chosen if alpha != 0.0 else [])
