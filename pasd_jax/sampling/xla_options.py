"""XLA compiler options for the big programs (the sampler's untiled and tiled programs, bench_step), per backend.

CPU: XLA's own convolution emitter instead of the YNNPACK convolution fusion that jax 0.10's CPU backend uses by
default. Measured on a 2-vCPU EPYC VM, fp32, SD1.5 shapes, min of 5 (YNNPACK -> XLA's): 64x64 320->320 3x3 conv
0.109 -> 0.085 s, 64x64 960->320 0.327 -> 0.275 s, 32x32 640->640 0.098 -> 0.084 s, 16x16 1280->1280 0.142 ->
0.090 s (PyTorch's oneDNN: 0.105, 0.268, 0.084, 0.112 s); convolutions are a third of a PASD step on CPU. The
value keeps the YNNPACK dot fusions (the default set less `INDIVIDUAL_CONVOLUTION`: the probe in
tests/test_xla_options.py checks that a conv+dot+eltwise program fuses as by default apart from the conv).

Options a jax/XLA build does not know make compilation fail, so `compiler_options()` probes them once on a tiny
program and returns {} where they are refused.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.lru_cache(maxsize=None)
def _accepted(items: tuple[tuple[str, Any], ...]) -> bool:
    try:
        jax.jit(lambda x: x * 2).lower(jnp.ones(8)).compile(compiler_options=dict(items))
    except Exception:  # noqa: BLE001 - an unknown option or value: run with the defaults
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The options for this backend's programs ({} off the CPU, or where this XLA refuses them)."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or not _accepted(tuple(sorted(CPU_OPTIONS.items()))):
        return {}
    return dict(CPU_OPTIONS)


def jit(fn: Any, **kwargs: Any) -> Any:
    """`jax.jit` with this backend's options: the one way the sampler's big programs are compiled."""
    return jax.jit(fn, compiler_options=compiler_options() or None, **kwargs)
