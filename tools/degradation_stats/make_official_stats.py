"""Records per-pair statistics of PASD's official torch degradation on crops of shared/examples.

Run in the separate torch venv with the official checkout under the git-ignored third_party/ (see README):

    .torchenv/bin/python tools/degradation_stats/make_official_stats.py \
        --pasd-dir third_party/PASD --examples ../shared/examples --n 400 --seed 0 \
        --out tests/data/official_degradation_stats.json

Crops come from `data_pipeline.pair_stats.reference_crops` (the same crops the tests degrade with our port);
the statistics from `data_pipeline.pair_stats.pair_stats`. Only numbers are written.
"""
from __future__ import annotations

import json
import pathlib
import platform
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from official_env import official_degradation, parser  # noqa: E402


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "official_degradation_stats.json"))
    ap.add_argument("--dump-lq", default=None, help="also save the official LQ images (uint8 .npy, not committed)")
    args = ap.parse_args()

    deg = official_degradation(args.pasd_dir, args.seed)
    import cv2
    import torch

    from data_pipeline.pair_stats import STAT_NAMES, STATS_VERSION, pair_stats, reference_crops

    stats = {k: [] for k in STAT_NAMES}
    lqs = []
    t0 = time.perf_counter()
    for crop in reference_crops(args.examples, args.n, seed=args.seed):
        gt_t, lq_t = deg.degrade_process(np.asarray(crop) / 255.0, resize_bak=True)
        gt = np.rint(gt_t[0].numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)  # exact: gt is uint8 / 255
        lq = np.rint(lq_t[0].numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)  # exact: lq is on 8-bit levels
        if args.dump_lq:
            lqs.append(lq if np.array_equal(gt, crop) else lq[:, ::-1])  # undo the official flip
        for k, v in pair_stats(gt, lq).items():
            stats[k].append(round(v, 6))
    elapsed = time.perf_counter() - t0
    if args.dump_lq:
        np.save(args.dump_lq, np.stack(lqs))

    meta = {
        "what": "per-pair statistics of PASD's official degradation (degrade_process, resize_bak=True)",
        "pasd_commit": "yangxy/PASD@396f9ac",
        "stats_version": STATS_VERSION, "n": args.n, "seed": args.seed,
        "crops": "data_pipeline.pair_stats.reference_crops(examples, n, seed)",
        "examples": "shared/examples (RealSRSet + Set5)",
        "torch": torch.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
        "python": platform.python_version(), "seconds": round(elapsed, 1),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "stats": stats}, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({args.n} pairs, {elapsed:.0f} s)")
    for k, v in stats.items():
        print(f"  {k:16s} mean {np.mean(v):8.4f}  p10 {np.percentile(v, 10):8.4f}  p90 {np.percentile(v, 90):8.4f}")


if __name__ == "__main__":
    main()
