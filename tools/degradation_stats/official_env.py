"""Imports PASD's official degradation from a git-ignored checkout, inside a separate torch venv.

Only the few torchvision names PASD's data code imports are stubbed (torchvision's PyPI wheel does not load
beside the local CPU torch wheel); the one that runs, `rgb_to_grayscale`, is written out from its documented
formula (0.2989 R + 0.587 G + 0.114 B).
"""
from __future__ import annotations

import argparse
import pathlib
import random
import sys
import types

REPO = pathlib.Path(__file__).resolve().parents[2]


def _stub_torchvision() -> None:
    if "torchvision" in sys.modules:
        return

    def rgb_to_grayscale(img, num_output_channels=1):
        r, g, b = img.unbind(dim=-3)
        gray = (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(dim=-3)
        return gray.expand(img.shape) if num_output_channels == 3 else gray

    def unused(*args, **kwargs):
        raise NotImplementedError("torchvision stub: not used by the degradation")

    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    tvt = types.ModuleType("torchvision.transforms")
    tvt.__path__ = []
    tvf = types.ModuleType("torchvision.transforms.functional")
    tvu = types.ModuleType("torchvision.utils")
    tvf.rgb_to_grayscale = rgb_to_grayscale
    for name in ("adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "normalize"):
        setattr(tvf, name, unused)
    tvu.make_grid = unused
    tv.transforms, tv.utils, tvt.functional = tvt, tvu, tvf
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tvt,
                        "torchvision.transforms.functional": tvf, "torchvision.utils": tvu})


def load_official(pasd_dir: str | pathlib.Path):
    """Returns PASD's `pasd.dataloader.realesrgan` module from the checkout at `pasd_dir`."""
    pasd_dir = pathlib.Path(pasd_dir).resolve()
    if not (pasd_dir / "pasd" / "dataloader" / "realesrgan.py").is_file():
        raise FileNotFoundError(f"{pasd_dir} is not a PASD checkout (pasd/dataloader/realesrgan.py missing)")
    _stub_torchvision()
    sys.path.insert(0, str(pasd_dir))
    import pasd.dataloader.realesrgan as realesrgan  # noqa: E402

    return realesrgan


def parser(doc: str | None, *, examples: bool = True) -> argparse.ArgumentParser:
    """The tools' common flags: the official checkout and (optionally) the example images."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--pasd-dir", default=str(REPO / "third_party" / "PASD"))
    if examples:
        ap.add_argument("--examples", default=str(REPO.parent / "shared" / "examples"))
    return ap


def official_degradation(pasd_dir: str | pathlib.Path, seed: int):
    """PASD's `RealESRGAN_degradation` on one CPU thread, with the global python, numpy and torch generators (the
    ones the official code draws from) seeded."""
    realesrgan = load_official(pasd_dir)
    import cv2
    import numpy as np
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return realesrgan.RealESRGAN_degradation(device="cpu")
