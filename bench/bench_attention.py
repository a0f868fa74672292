"""The attention kernels one against another on the SD1.5 / PASD attention shapes of a step at a given size.

For each distinct (batch, heads, q_len, kv_len, head_dim) of the ControlNet + PASD UNet step with CFG, times every
applicable kernel (interleaved, min and median of the repeats) and says which one `plan_attention` picks, so the
thresholds of `pasd_jax.models.attention` can be checked on the machine at hand.

    python bench/bench_attention.py --sizes 256 512 --dtype float32 --kernels xla flash --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import dtype_of, emit, environment  # noqa: E402
from pasd_jax.models import attention as A  # noqa: E402


def step_shapes(size: int, batch: int = 1) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, q_len, kv_len, head_dim) of the SD1.5 attention calls of one CFG step at `size` px."""
    shapes = set()
    b = 2 * batch
    for level, ch in enumerate((320, 640, 1280, 1280)):
        tokens = (size // 8 // 2 ** level) ** 2
        d = ch // 8
        if level < 3:
            shapes.add((b, 8, tokens, tokens, d))   # self-attention and PACA
            shapes.add((b, 8, tokens, 77, d))       # text cross-attention
        else:
            shapes.add((b, 8, tokens, tokens, d))   # mid block / lowest PACA
    return sorted(shapes, key=lambda s: -s[2] * s[3])


def compiled_kernel(kernel: str, shape, dtype):
    """The compiled attention call with `kernel` forced, and its random inputs."""
    b, n, lq, lk, d = shape
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, lq, n * d), dtype)
    k, v = (jax.random.normal(kk, (b, lk, n * d), dtype) for kk in ks[1:])
    with A.attention_impl(kernel):
        f = jax.jit(lambda q, k, v: A.multi_head_attention(q, k, v, n))
        compiled = f.lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    return compiled, (q, k, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kernels", nargs="+", default=["xla", "flash"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dtype = dtype_of(a.dtype)
    rows = []
    for shape in sorted({s for size in a.sizes for s in step_shapes(size)}, key=lambda s: -s[2] * s[3]):
        b, n, lq, lk, d = shape
        plan = A.plan_attention(b, n, lq, lk, d, dtype)
        progs = {kern: compiled_kernel(kern, shape, dtype) for kern in a.kernels}
        times = {kern: [] for kern in a.kernels}
        ref = None
        for kern, (f, args) in progs.items():  # agreement with the first kernel, printed
            out = np.asarray(f(*args), np.float64)
            ref = out if ref is None else ref
            err = float(np.abs(out - ref).max())
            progs[kern] = (f, args, err)
        for _ in range(a.repeats):  # interleaved: kernel A, kernel B, kernel A, ...
            for kern, (f, args, _) in progs.items():
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[kern].append(time.perf_counter() - t)
        row = {"batch": b, "heads": n, "q_len": lq, "kv_len": lk, "head_dim": d, "auto": plan.kernel,
               "q_block": plan.q_block, "kv_block": plan.kv_block,
               "full_logits_mb": round(plan.full_logits_bytes / 2 ** 20, 1), "load_avg": os.getloadavg()[0]}
        for kern in a.kernels:
            row[f"{kern}_min_ms"] = round(1000 * min(times[kern]), 2)
            row[f"{kern}_median_ms"] = round(1000 * statistics.median(times[kern]), 2)
            row[f"{kern}_max_abs_diff"] = progs[kern][2]
        print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
        rows.append(row)
    emit({"benchmark": "attention_kernels", "dtype": a.dtype, "env": environment(), "rows": rows}, a.out)


if __name__ == "__main__":
    main()
