"""Op-by-op numeric check of data_pipeline against PASD's official torch ops, live (run in the torch venv).

    .torchenv/bin/python tools/degradation_stats/check_ops.py --pasd-dir third_party/PASD \
        --shapes 512x512,373x389 --kernel-draws 50

Runs the cases of `op_cases.build_cases` (the same list `make_op_refs.py` stores for the tests) on images of
the given sizes and prints max |ours - official| per case (with -v) and per op kind, with the official op's own
float32 rounding (|official f32 - f64|) for blur and resizes and the mean difference for DiffJPEG.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from official_env import load_official, parser  # noqa: E402
from op_cases import KINDS, build_cases, max_abs, official, ours  # noqa: E402


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(h), int(w)) for h, w in (s.lower().split("x") for s in text.split(",")))
    except ValueError:
        raise SystemExit(f"--shapes must look like 512x512,373x389 (HxW, comma separated), got {text!r}") from None


def main() -> None:
    ap = parser(__doc__, examples=False)
    ap.add_argument("--shapes", default="512x512,373x389", help="image sizes HxW, comma separated")
    ap.add_argument("--kernel-draws", type=int, default=50, help="random kernels per family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = ap.parse_args()
    load_official(args.pasd_dir)
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    imgs, cases = build_cases(_shapes(args.shapes), seed=args.seed, kernel_draws=args.kernel_draws)
    worst = dict.fromkeys(KINDS, 0.0)
    worst64 = dict.fromkeys(("blur", "resize_by", "resize_to"), 0.0)
    jpeg_mean = 0.0
    for c in cases:
        ref = official(c, imgs)
        mine = ours(c, imgs)
        err = max_abs(mine, ref)
        worst[c.kind] = max(worst[c.kind], err)
        line = f"{c.name:44s} {err:.3g}"
        if c.kind in worst64:
            d64 = max_abs(ref, official(c, imgs, dtype="float64"))
            worst64[c.kind] = max(worst64[c.kind], d64)
            line += f"  (official f32 vs f64 {d64:.3g})"
        if c.kind == "jpeg":
            jpeg_mean = max(jpeg_mean, float(np.abs(mine - ref).mean()))
        if args.verbose:
            print(line)
    for kind, v in worst.items():
        extra = f"  official f32 vs f64 {worst64[kind]:.3g}" if kind in worst64 else ""
        extra += f"  worst mean {jpeg_mean:.3g}" if kind == "jpeg" else ""
        print(f"{kind:16s} max |ours - official| {v:.3g}{extra}")


if __name__ == "__main__":
    main()
