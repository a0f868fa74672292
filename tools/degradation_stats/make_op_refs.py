"""Stores PASD's official op outputs on small fixed inputs for `tests/test_degradation_op_refs.py`.

Run in the separate torch venv with the official checkout under the git-ignored third_party/ (see README):

    .torchenv/bin/python tools/degradation_stats/make_op_refs.py --pasd-dir third_party/PASD

The cases are `op_cases.build_cases()`. Written: every input image, every official output (float32; kernels
float64), the random fields the official noise ops drew, and per case the distance between the official op in
float32 and in float64 (blur and resizes), so the test can tell our error from float32's own rounding, and for
DiffJPEG how far the inputs' coefficients are from a rounding tie (refused below 10x float32 noise).
"""
from __future__ import annotations

import json
import pathlib
import platform
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from official_env import load_official, parser  # noqa: E402
from op_cases import build_cases, jpeg_tie_margin, max_abs, official, ours  # noqa: E402

FORMAT_VERSION = 1
F64_KINDS = ("blur", "resize_by", "resize_to")
MIN_TIE_MARGIN = 10.0  # a stored JPEG case must not be decided by float32 noise (op_cases.jpeg_tie_margin)


def main() -> None:
    ap = parser(__doc__, examples=False)
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "degradation_op_refs.npz"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    load_official(args.pasd_dir)
    import cv2
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    imgs, cases = build_cases(seed=args.seed)
    used = {c.params["input"] for c in cases if "input" in c.params}
    arrays = {f"img/{k}": v for k, v in imgs.items() if k in used}
    meta_cases = []
    for c in cases:
        out = official(c, imgs)
        arrays[f"out/{c.name}"] = out
        entry = {"name": c.name, "kind": c.kind, "params": c.params}
        if c.field is not None:  # Poisson counts are integers: uint16 holds them exactly
            counts = c.kind == "poisson_noise" and np.array_equal(c.field, np.rint(c.field)) and c.field.max() < 2**16
            arrays[f"field/{c.name}"] = c.field.astype(np.uint16) if counts else c.field
        if c.kind in F64_KINDS:
            entry["f32_vs_f64"] = max_abs(out, official(c, imgs, dtype="float64"))
        if c.kind == "jpeg":
            entry["tie_margin"] = jpeg_tie_margin(imgs[c.params["input"]], c.params["quality"])
            if entry["tie_margin"] < MIN_TIE_MARGIN:
                raise SystemExit(f"{c.name}: a DCT coefficient is within float32 noise of a rounding tie "
                                 f"(margin {entry['tie_margin']:.2f}); pick another quality or input")
        entry["ours_now"] = max_abs(ours(c, imgs), out)  # informative only; the test recomputes it
        meta_cases.append(entry)
        print(f"{c.name:40s} ours {entry['ours_now']:.3g}"
              + (f"  (official f32 vs f64 {entry['f32_vs_f64']:.3g})" if "f32_vs_f64" in entry else "")
              + (f"  (tie margin {entry['tie_margin']:.3g})" if "tie_margin" in entry else ""))
    meta = {"format_version": FORMAT_VERSION, "seed": args.seed, "pasd_commit": "yangxy/PASD@396f9ac",
            "torch": torch.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
            "python": platform.python_version(), "cases": meta_cases}
    arrays["meta"] = np.array(json.dumps(meta))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {len(cases)} cases, {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
