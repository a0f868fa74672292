"""CPU time per 512x512 pair of PASD's official torch degradation (one thread), for the benchmark's baseline.

    taskset -c 0 .torchenv/bin/python tools/degradation_stats/time_official.py --n 40
"""
from __future__ import annotations

import json
import pathlib
import sys
import time


REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from official_env import official_degradation, parser  # noqa: E402


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    deg = official_degradation(args.pasd_dir, 0)
    import torch

    from data_pipeline.pair_stats import reference_crops

    crops = [c / 255.0 for c in reference_crops(args.examples, args.n, seed=0)]
    for c in crops[:5]:
        deg.degrade_process(c, resize_bak=True)
    wall, cpu = [], []
    for _ in range(args.repeats):
        t, c0 = time.perf_counter(), time.process_time()
        for c in crops:
            deg.degrade_process(c, resize_bak=True)
        wall.append(args.n / (time.perf_counter() - t))
        cpu.append(args.n / (time.process_time() - c0))
    print(json.dumps({"official_pairs_per_s_wall": [round(v, 2) for v in wall],
                      "official_pairs_per_s_cpu": [round(v, 2) for v in cpu], "torch": torch.__version__}))


if __name__ == "__main__":
    main()
