"""Data pipeline throughput: the degradation alone, and end to end through Grain with PNG decode.

    python bench/bench_data.py [--examples ../shared/examples] [--workers 1 2 4] [--out result.json]

Prints one JSON object:
- "degrade": 512x512 crops through `degrade_uint8` (exact PASD preset) pinned to one core: pairs/s from
  wall time and from process CPU time (on a shared machine CPU time is the steadier per-core figure).
- "end_to_end": 640x640 PNG files -> FolderSource -> decode, crop 512, flip, degrade, batch 16 -> mp_prefetch
  with 1, 2, 4 workers: pairs/s over the measured batches (after warm-up and after draining the
  prefetch buffers), pairs/s per worker core (total / min(workers, cores)), and pairs per CPU-second
  summed over the main process and its workers (the per-core figure that survives a busy machine).
Reference: PASD's own torch-CPU degradation does about 7.6 pairs/s per core (measured elsewhere).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from data_pipeline.degradation import degrade_uint8  # noqa: E402
from data_pipeline.sources import ProceduralSource  # noqa: E402


def _crops(examples: pathlib.Path | None, n: int) -> list[np.ndarray]:
    if examples is not None and examples.is_dir():
        from data_pipeline.pair_stats import reference_crops

        return list(reference_crops(examples, n, seed=0))
    src = ProceduralSource(n, 512, seed=0)
    return [src[i]["image"] for i in range(n)]


def bench_degrade(examples, n: int, repeats: int, core: int) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)
    crops = _crops(examples, n)
    for i in range(min(n, 20)):  # warm-up: caches of kernels grids, area matrices, Poisson tables
        degrade_uint8(crops[i], np.random.Generator(np.random.Philox(10**6 + i)))
    wall, cpu = [], []
    for r in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for i, hq in enumerate(crops):
            degrade_uint8(hq, np.random.Generator(np.random.Philox(r * n + i)))
        wall.append(n / (time.perf_counter() - t))
        cpu.append(n / (time.process_time() - c))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return {"n": n, "repeats": repeats, "core": core, "pairs_per_s_wall": [round(v, 1) for v in wall],
            "pairs_per_s_cpu": [round(v, 1) for v in cpu], "best_wall": round(max(wall), 1),
            "median_cpu": round(float(np.median(cpu)), 1), "ms_per_pair_cpu": round(1000 / float(np.median(cpu)), 1)}


def _png_folder(root: pathlib.Path, n: int, size: int) -> None:
    src = ProceduralSource(n, size, seed=1)
    for i in range(n):
        cv2.imwrite(str(root / f"{i:05d}.png"), src[i]["image"][:, :, ::-1])
        (root / f"{i:05d}.txt").write_text(src[i]["caption"])


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live children (Linux /proc; the Grain workers)."""
    total = time.process_time()
    tck = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    for st in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tck  # utime + stime
    return total


def bench_end_to_end(workers: list[int], n_images: int, size: int, batch: int, warm: int, measure: int) -> list:
    from data_pipeline.loader import make_train_iterator
    from data_pipeline.sources import FolderSource

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        _png_folder(root, n_images, size)
        src = FolderSource(root)
        png_kb = sum(p.stat().st_size for p in root.glob("*.png")) / n_images / 1024
        for nw in workers:
            with make_train_iterator(None, seed=0, process_index=0, process_count=1, batch_size=batch,
                                     tokenizer_path=None, num_workers=nw, source=src) as it:
                t0 = time.perf_counter()
                next(it)
                startup = time.perf_counter() - t0
                # drain what the workers buffered meanwhile, so that the timed batches are produced while timed
                for _ in range(warm + 2 * max(nw, 1)):
                    next(it)
                t, c = time.perf_counter(), _tree_cpu_seconds()
                for _ in range(measure):
                    next(it)
                rate = measure * batch / (time.perf_counter() - t)
                # CPU-time rate: pairs per CPU-second of main + workers (robust to other load on the machine;
                # it slightly overstates the work when buffers refill after the timed window)
                cpu_rate = measure * batch / max(_tree_cpu_seconds() - c, 1e-9)
            cores = min(nw, os.cpu_count() or 1) if nw else 1
            out.append({"workers": nw, "pairs_per_s": round(rate, 1),
                        "pairs_per_s_per_worker_core": round(rate / cores, 1),
                        "pairs_per_cpu_s": round(cpu_rate, 1),
                        "warmup_s": round(startup, 1), "batch": batch, "measured_batches": measure,
                        "png_size": size, "png_kb": round(png_kb, 1)})
    return out


def _meta() -> dict:
    import grain
    import scipy

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
            "scipy": scipy.__version__, "grain": getattr(grain, "__version__", "?")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", default=str(REPO.parent / "shared" / "examples"))
    ap.add_argument("--n", type=int, default=60, help="crops per degradation repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warm", type=int, default=2, help="extra batches before timing (buffers are drained too)")
    ap.add_argument("--measure", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    meta = _meta()
    res = {"meta": meta,
           "degrade": bench_degrade(pathlib.Path(args.examples), args.n, args.repeats, args.core)}
    if args.workers:
        res["end_to_end"] = bench_end_to_end(args.workers, args.images, 640, args.batch, args.warm, args.measure)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
