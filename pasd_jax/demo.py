"""The offline demo: train tiny PASD briefly, then super-resolve an image the project made, end to end.

    python -m pasd_jax.demo --out demo_out [--train-steps 60]     (or: pasd-demo)

1. `train.py`'s loop on `configs/tiny.py`: tiny random-init SD base (frozen), ControlNet + PACA trained on procedural
   images degraded on the fly by PASD's Real-ESRGAN pipeline; checkpoint, metrics.jsonl and TensorBoard events in
   `<out>/train`.
2. A held-out procedural image (never in the training set) is degraded the same way and shrunk 4x: the LQ input.
3. `pasd-sample` (sample.py) restores the checkpoint and super-resolves it x4 (UniPC, 20 steps, CFG, ANS, wavelet
   colour fix) into `<out>/result/lq.png`.
4. `<out>/comparison.png`, the picture `pasd-evaluate --grid` makes: LQ enlarged by nearest neighbour and by bicubic,
   the PASD output and the ground truth, the same zoomed crop under each, PSNR (Y) under the bicubic and PASD
   columns, and under the picture the notice that the models are tiny and random.

Nothing is downloaded; the tiny models learn little in a minute, so the output shows that the whole pipeline runs,
not PASD's quality.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from PIL import Image

HOLDOUT_SEED = 12345  # the training set uses procedural seed 0
SIZE = 64


def _train(workdir: pathlib.Path, steps: int) -> None:
    from configs import tiny
    from pasd_jax.train.loop import train

    config = tiny.get_config()
    config.steps = steps
    config.checkpoint_every = steps
    config.progress = True
    result = train(config, workdir)
    print(f"trained to step {result.step}: loss {result.metrics.get('loss', float('nan')):.4f}")


def _test_images(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    from data_pipeline.degradation import degrade
    from data_pipeline.sources import ProceduralSource

    hq = ProceduralSource(1, size=SIZE, seed=HOLDOUT_SEED)[0]["image"]
    lq_full = np.clip(np.rint(degrade(hq, seed=HOLDOUT_SEED) * 255), 0, 255).astype(np.uint8)
    lq = np.asarray(Image.fromarray(lq_full).resize((SIZE // 4, SIZE // 4), Image.BICUBIC))
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lq).save(folder / "lq.png")
    Image.fromarray(hq).save(folder / "hq.png")
    return lq, hq


NOTICE = ("The models are tiny and random: a random-init tiny SD base, with ControlNet + PACA trained {steps} steps "
          "on procedural images. This picture shows that the whole path runs (training, checkpoint, sampling, "
          "evaluation), not PASD's quality.")


def _comparison(lq: np.ndarray, out: np.ndarray, hq: np.ndarray, path: pathlib.Path, train_steps: int,
                sample_steps: int) -> None:
    from pasd_jax.evaluate.grid import Panel, auto_crop, comparison, lq_panels, with_caption
    from pasd_jax.evaluate.psnr_ssim import psnr
    from pasd_jax.safe_write import atomic_write

    nearest, bicubic = lq_panels(lq, (SIZE, SIZE))
    p_bicubic, p_pasd = psnr(bicubic.image, hq, y_channel=True), psnr(out, hq, y_channel=True)
    panels = [nearest, Panel(bicubic.label, bicubic.image, f"PSNR (Y) {p_bicubic:.2f} dB"),
              Panel(f"PASD x4, {sample_steps} steps", out, f"PSNR (Y) {p_pasd:.2f} dB"), Panel("ground truth", hq)]
    picture = with_caption(comparison(panels, auto_crop(hq), 256), [NOTICE.format(steps=train_steps)])
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    print(f"PSNR (Y) vs ground truth: bicubic {p_bicubic:.2f} dB, PASD {p_pasd:.2f} dB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out)
    t0 = time.perf_counter()
    _train(out / "train", a.train_steps)
    lq, hq = _test_images(out / "input")
    from pasd_jax.sampling import cli as sample_cli

    code = sample_cli.main(["--ckpt", str(out / "train"), "--input", str(out / "input" / "lq.png"),
                        "--output", str(out / "result"), "--upscale", "4", "--process-size", str(SIZE),
                        "--steps", str(a.steps), "--dtype", "float32", "--overwrite", "--no-cache"])
    if code:
        return code
    result = np.asarray(Image.open(out / "result" / "lq.png").convert("RGB"))
    _comparison(lq, result, hq, out / "comparison.png", a.train_steps, a.steps)
    print(f"done in {time.perf_counter() - t0:.0f} s: {out / 'result' / 'lq.png'} and {out / 'comparison.png'}")
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
