"""Imports PASD's official degradation from a git-ignored checkout, inside a separate torch venv.

Only the few torchvision names PASD's data code imports are stubbed (torchvision's PyPI wheel does not load
beside the local CPU torch wheel); the one that runs, `rgb_to_grayscale`, is written out from its documented
formula (0.2989 R + 0.587 G + 0.114 B).
"""
from __future__ import annotations

import pathlib
import sys
import types


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
