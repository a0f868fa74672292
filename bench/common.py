"""Shared helpers for the benchmark scripts: environment record, timing, memory, random SD1.5-size models."""
from __future__ import annotations

import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pasd_jax.models.host_init import host_params

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = REPO / "pasd_jax" / "assets"


def environment() -> dict[str, Any]:
    """Everything a figure needs to be reproducible: device, versions, commit, date."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    dev = jax.devices()[0]
    import flax

    return {"date": datetime.date.today().isoformat(), "commit": commit, "python": platform.python_version(),
            "jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "device_count": jax.device_count()}


def time_fn(fn: Callable[[], Any], repeats: int = 10, warmup: int = 1) -> dict[str, float]:
    """Wall time of fn() (which must block until its result is ready): first call (compile) and the rest."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "repeats": repeats}


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def load_config(model: str, component: str) -> dict:
    """Model configs shipped with the package: `sd15` (full size) or `tiny` (CPU smoke runs)."""
    path = ASSETS / model / component / "config.json"
    if not path.is_file():
        raise SystemExit(f"no {component} config for model {model!r} at {path}")
    return json.loads(path.read_text())


def random_params(module, seed: int, dtype: Any, stream: str = "") -> Any:
    """Random weights from the modules' own distributions, drawn on the host (no init program to compile: the
    SD1.5 UNet's takes minutes) and placed on the device in the benchmark dtype."""
    params = host_params(module, seed, stream=stream or type(module).__name__)
    return jax.device_put(jax.tree_util.tree_map(lambda x: x.astype(dtype), params))


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        pathlib.Path(out).write_text(text + "\n")


def dtype_of(name: str):
    try:
        return {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16,
                "float32": jnp.float32, "fp32": jnp.float32}[name]
    except KeyError:
        sys.exit(f"unknown dtype {name!r}")
