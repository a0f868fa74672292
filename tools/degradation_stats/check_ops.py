"""Op-by-op numeric check of data_pipeline against PASD's official torch ops (run in the torch venv).

    /work/torchenv/bin/python tools/degradation_stats/check_ops.py --pasd-dir third_party/PASD

Prints the max |difference| for each op on random inputs; the results are quoted in this folder's README.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from official_env import load_official, parser  # noqa: E402


def main() -> None:
    args = parser(__doc__, examples=False).parse_args()
    load_official(args.pasd_dir)
    import torch
    import torch.nn.functional as F
    from pasd.dataloader.basicsr.data import degradations as odeg
    from pasd.dataloader.basicsr.utils.diffjpeg import DiffJPEG
    from pasd.dataloader.basicsr.utils.img_process_util import filter2D

    from data_pipeline import kernels, resize
    from data_pipeline.degradation import blur
    from data_pipeline.diffjpeg import diff_jpeg

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]  # noqa: E731
    to_n = lambda t: t[0].detach().numpy().transpose(1, 2, 0)  # noqa: E731
    report = {}

    # kernels: closed forms vs basicsr
    err = 0.0
    for _ in range(200):
        size = int(rng.choice(np.arange(7, 22, 2)))
        sx, sy, th = rng.uniform(0.2, 3), rng.uniform(0.2, 3), rng.uniform(-np.pi, np.pi)
        beta = rng.uniform(0.5, 4)
        pairs = [
            (kernels.gaussian_kernel(size, sx, sy, th), odeg.bivariate_Gaussian(size, sx, sy, th, isotropic=False)),
            (kernels.generalized_gaussian_kernel(size, sx, sy, th, beta),
             odeg.bivariate_generalized_Gaussian(size, sx, sy, th, beta, isotropic=False)),
            (kernels.plateau_kernel(size, sx, sy, th, beta),
             odeg.bivariate_plateau(size, sx, sy, th, beta, isotropic=False)),
        ]
        omega = rng.uniform(np.pi / 5, np.pi)
        pairs.append((kernels.sinc_kernel(size, omega), odeg.circular_lowpass_kernel(omega, size, pad_to=False)))
        err = max(err, max(float(np.abs(a - b).max()) for a, b in pairs))
    report["kernels (4 families, 200 draws)"] = err

    # filter2D (reflect pad + conv) vs cv2/FFT paths, unpadded vs 21x21 zero-padded kernel
    img = rng.random((512, 512, 3), dtype=np.float32)
    err = 0.0
    for size in (7, 11, 13, 21):
        k = kernels.gaussian_kernel(size, 2.5, 1.1, 0.7).astype(np.float32)
        p = (21 - size) // 2
        ref = to_n(filter2D(to_t(img), torch.from_numpy(np.pad(k, p))[None]))
        err = max(err, float(np.abs(blur(img, kernels.Kernel(k)) - ref).max()))
    g = kernels.gaussian_1d(21, 2.0).astype(np.float32)
    ref = to_n(filter2D(to_t(img), torch.from_numpy(np.outer(g, g))[None]))
    err = max(err, float(np.abs(blur(img, kernels.Kernel(np.outer(g, g), g)) - ref).max()))
    report["filter2D (7/11/13/21 taps, separable)"] = err

    # F.interpolate with scale_factor (stage 1) and size (stage 2, final, resize back)
    for mode in ("area", "bilinear", "bicubic"):
        err = 0.0
        for s in (0.3, 0.4567, 0.73, 1.0, 1.234, 1.5):
            ref = to_n(F.interpolate(to_t(img), scale_factor=s, mode=mode))
            ours = resize.resize_by(img, s, mode)
            assert ours.shape == ref.shape, (mode, s, ours.shape, ref.shape)
            err = max(err, float(np.abs(ours - ref).max()))
        small = rng.random((137, 151, 3), dtype=np.float32)
        for hw in ((128, 128), (76, 76), (153, 153), (512, 512)):
            ref = to_n(F.interpolate(to_t(small), size=hw, mode=mode))
            err = max(err, float(np.abs(resize.resize_to(small, *hw, mode) - ref).max()))
        report[f"interpolate {mode}"] = err

    # DiffJPEG, sizes not multiple of 16, continuous quality
    jpeger = DiffJPEG(differentiable=False)
    err = 0.0
    mean_err = 0.0
    cases = (((373, 389), 61.3), ((512, 512), 95.0), ((128, 128), 99.7), ((150, 77), 72.5), ((200, 200), 35.0))
    for (h, w), q in cases:
        x = rng.random((h, w, 3), dtype=np.float32)
        x = np.clip(x * 0.6 + 0.2 + 0.2 * np.sin(np.arange(w) / 7.0)[None, :, None], 0, 1).astype(np.float32)
        ref = to_n(jpeger(to_t(x), quality=torch.tensor([q], dtype=torch.float32)))
        d = np.abs(diff_jpeg(x, q) - ref)
        err, mean_err = max(err, float(d.max())), max(mean_err, float(d.mean()))
    report["DiffJPEG max"] = err
    report["DiffJPEG mean"] = mean_err

    for name, v in report.items():
        print(f"{name:45s} {v:.3g}")


if __name__ == "__main__":
    main()
