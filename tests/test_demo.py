"""`python -m pasd_jax.demo` as a newcomer runs it: from another folder, the package found only as installed (not
through the checkout on sys.path), writing the result and the comparison picture with its notice."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-P", "-m", "pasd_jax.demo", "--out", "demo", "--train-steps", "2",
                           "--steps", "2"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    print(proc.stdout[-1500:], proc.stderr[-1500:], f"demo took {seconds:.0f} s", sep="\n")
    assert proc.returncode == 0
    out = cwd / "demo"
    result = np.asarray(Image.open(out / "result" / "lq.png").convert("RGB"))
    assert result.shape == (64, 64, 3)  # 16x16 LQ, x4
    picture = Image.open(out / "comparison.png")
    assert picture.format == "PNG" and picture.size[0] == 4 * (256 + 4) + 4  # nearest, bicubic, PASD, GT
    caption = np.asarray(picture.convert("RGB"))[-40:].astype(int)
    assert ((caption[..., 0] > 120) & (caption[..., 1] < 60)).any()  # the dark-red notice under the picture
    assert "PSNR (Y) vs ground truth" in proc.stdout and "comparison.png" in proc.stdout
    assert (out / "train").is_dir() and (out / "input" / "hq.png").is_file()
    imported = subprocess.run([sys.executable, "-P", "-c", "import pasd_jax, sys; print(pasd_jax.__file__); "
                               "print(any(p in ('', '.') for p in sys.path))"],
                              cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert imported[1] == "False"  # neither the checkout nor the cwd was on sys.path: the installed package ran
    assert pathlib.Path(imported[0]).resolve().is_relative_to(REPO)  # the editable install of this checkout
