"""`bench_step.py --compare-official`: our step and the official PyTorch step in alternating fresh processes.

On a shared machine the load changes by the minute, so the two sides are measured as interleaved pairs (ours,
official, ours, official, ...) on the same CPUs (affinity of both processes; torch's intra-op threads = that
count; XLA sizes its CPU pool from the schedulable CPUs), one process at a time and one per size, each reporting its
own step times, peak resident memory (loading + that size's step, for both sides) and the load average around its
timed steps. The summary gives per size the min and median
of each side over all rounds and the speed ratio official / ours (above 1: ours is faster).

Our processes share a persistent compilation cache (JAX_COMPILATION_CACHE_DIR, a temp dir unless set), so only the
first round compiles. The official side needs a python with torch + diffusers 0.29.2 (`--official-python`, else
$PASD_OFFICIAL_PYTHON, else `.torchenv/bin/python` in the checkout) and the folder of bench/prepare_official.sh.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]


def official_python(arg: str | None) -> str:
    for cand in (arg, os.environ.get("PASD_OFFICIAL_PYTHON"), str(REPO / ".torchenv" / "bin" / "python")):
        if cand and pathlib.Path(cand).exists():
            return cand
    raise SystemExit("--compare-official needs a python with torch and diffusers==0.29.2: pass --official-python "
                     "or set PASD_OFFICIAL_PYTHON (bench/prepare_official.sh explains the official code folder)")


def _run(cmd: list[str], cpus: set[int], env: dict[str, str], label: str) -> dict[str, Any]:
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    out.close()
    t0 = time.perf_counter()
    print(f"[compare {time.strftime('%H:%M:%S')}] {label}: load average {os.getloadavg()[0]:.2f}", file=sys.stderr,
          flush=True)
    proc = subprocess.run([*cmd, "--out", out.name], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if proc.returncode:
        raise SystemExit(f"{label} failed (exit {proc.returncode}): {' '.join(cmd)}")
    result = json.loads(pathlib.Path(out.name).read_text())
    os.unlink(out.name)
    result["wall_s"] = time.perf_counter() - t0
    return result


def _side_rows(result: dict, side: str) -> dict[int, dict]:
    rows = {}
    for r in result["results"]:
        if side == "ours":
            rows[r["size"]] = {"min_s": r["min_s"], "median_s": r["median_s"], "load_avg": r["load_avg"],
                               "peak_rss_bytes": result["peak_rss_bytes"]}
        else:
            rows[r["size"]] = {"min_s": r["step"]["min_s"], "median_s": r["step"]["median_s"],
                               "load_avg": r["load_avg"], "peak_rss_bytes": result["peak_rss_bytes"]}
    return rows


def compare(a: Any) -> dict:
    cpus = set(sorted(os.sched_getaffinity(0))[:a.threads] if a.threads else os.sched_getaffinity(0))
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="pasd_step_xla_"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PLATFORMS", "cpu")
    ours = [sys.executable, str(REPO / "bench" / "bench_step.py"), "--model", a.model, "--variant", a.variant,
            "--dtype", a.dtype, "--repeats", str(a.repeats), "--attention", a.attention, "--weights", a.weights,
            "--xla-options", a.xla_options]
    config = "sd15" if a.model == "sd15" else str(REPO / "pasd_jax" / "assets" / a.model)
    official = [official_python(a.official_python), str(REPO / "bench" / "official_baseline.py"),
                "--config", config,
                "--dtype", a.dtype, "--repeats", str(a.repeats), "--warmup", "1", "--loop-steps", "0",
                "--threads", str(len(cpus))]
    rounds = []
    for i in range(a.rounds):
        pair: dict[str, Any] = {"ours": {"rows": {}, "raw": []}, "official": {"rows": {}, "raw": []}}
        for size in a.sizes:  # one process per size and side: each peak RSS is loading + that size's step
            for side, cmd in (("ours", ours), ("official", official)):
                res = _run([*cmd, "--sizes", str(size)], cpus, env, f"round {i + 1}/{a.rounds} {side} {size}px")
                row = _side_rows(res, side)[size]
                row["wall_s"] = res["wall_s"]
                pair[side]["rows"][size] = row
                pair[side]["raw"].append(res)
                print(f"[compare] round {i + 1} {side:8s} {size}px: min {row['min_s']:.2f} s, median "
                      f"{row['median_s']:.2f} s, load {row['load_avg'][0]:.1f}-{row['load_avg'][1]:.1f}, peak RSS "
                      f"{row['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        rounds.append(pair)
    summary = []
    for size in a.sizes:
        row: dict[str, Any] = {"size": size}
        for side in ("ours", "official"):
            mins = [r[side]["rows"][size]["min_s"] for r in rounds]
            meds = [r[side]["rows"][size]["median_s"] for r in rounds]
            row[side] = {"min_s": min(mins), "median_s": statistics.median(meds),
                         "peak_rss_bytes": max(r[side]["rows"][size]["peak_rss_bytes"] for r in rounds),
                         "load_avg": [x for r in rounds for x in r[side]["rows"][size]["load_avg"]]}
        row["speedup_min"] = row["official"]["min_s"] / row["ours"]["min_s"]
        row["speedup_median"] = row["official"]["median_s"] / row["ours"]["median_s"]
        row["pair_speedups"] = [r["official"]["rows"][size]["median_s"] / r["ours"]["rows"][size]["median_s"]
                                for r in rounds]
        summary.append(row)
        print(f"[compare] {size}px: ours min {row['ours']['min_s']:.2f} / median {row['ours']['median_s']:.2f} s, "
              f"official min {row['official']['min_s']:.2f} / median {row['official']['median_s']:.2f} s, "
              f"official/ours {row['speedup_min']:.2f}x (min) {row['speedup_median']:.2f}x (median); peak RSS ours "
              f"{row['ours']['peak_rss_bytes'] / 2**30:.2f} GiB, official "
              f"{row['official']['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    from bench.common import emit, environment

    result = {"benchmark": "pasd_step_vs_official", "dtype": a.dtype, "cpus": sorted(cpus), "rounds": a.rounds,
              "repeats": a.repeats, "env": environment(), "summary": summary,
              "rounds_detail": [{side: {k: v for k, v in p[side].items() if k != "raw"} for side in p}
                                for p in rounds],
              "ours_env": rounds[0]["ours"]["raw"][0]["env"],
              "official_torch": rounds[0]["official"]["raw"][0]["torch"]}
    emit(result, a.out)
    return result
