"""Multi-head attention with one kernel choice per call.

PACA at a 64x64 latent attends 4096 queries to 4096 keys per head; its score matrix must never be materialised on a
GPU. The choice is made at trace time from the backend, dtype and shapes:

- GPU, fp16/bf16, head_dim a multiple of 8 and <= 128: cuDNN flash attention (`jax.nn.dot_product_attention`).
- GPU otherwise (fp32, or SD1.5's head_dim 160 at the 1280-channel levels) with a large score matrix: query-chunked
  XLA attention, whose memory is bounded by the chunk.
- TPU with sequence lengths that are multiples of 128: the Pallas flash-attention kernel.
- Everything else: plain XLA attention with fp32 logits and softmax.

`record_kernels()` captures which kernel each layer got, for benchmarks and tests.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.layers import Dense

IMPLS = ("auto", "xla", "chunked", "cudnn", "pallas")
# Score matrices with more elements than this per (batch, head) are computed in query chunks off-cuDNN.
CHUNK_THRESHOLD = 1024 * 1024
QUERY_CHUNK = 1024

_state = threading.local()


def _forced_impl() -> str:
    return getattr(_state, "impl", "auto")


@contextlib.contextmanager
def attention_impl(impl: str) -> Iterator[None]:
    """Force one implementation for everything traced inside the block (tests, benchmarks, debugging)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")
    prev = _forced_impl()
    _state.impl = impl
    try:
        yield
    finally:
        _state.impl = prev


@contextlib.contextmanager
def record_kernels() -> Iterator[list[dict[str, Any]]]:
    """Collect one record per attention call traced inside the block."""
    log: list[dict[str, Any]] = []
    prev = getattr(_state, "log", None)
    _state.log = log
    try:
        yield log
    finally:
        _state.log = prev


def _cudnn_ok(head_dim: int, dtype) -> bool:
    return dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def choose_kernel(q_len: int, kv_len: int, head_dim: int, dtype, backend: str | None = None) -> str:
    forced = _forced_impl()
    if forced != "auto":
        return forced
    backend = backend or jax.default_backend()
    big = q_len * kv_len > CHUNK_THRESHOLD
    if backend in ("gpu", "cuda", "rocm"):
        if backend != "rocm" and _cudnn_ok(head_dim, jnp.dtype(dtype).type):
            return "cudnn"
        return "chunked" if big else "xla"
    if backend == "tpu" and q_len % 128 == 0 and kv_len % 128 == 0:
        return "pallas"
    return "chunked" if (big and backend != "cpu") else "xla"


def _xla(q, k, v, scale):
    # q [B, Lq, N, D], k/v [B, Lk, N, D]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _chunked(q, k, v, scale, chunk=QUERY_CHUNK):
    b, lq, n, d = q.shape
    if lq <= chunk:
        return _xla(q, k, v, scale)
    pad = (-lq) % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = qp.reshape(b, (lq + pad) // chunk, chunk, n, d).swapaxes(0, 1)
    out = jax.lax.map(lambda qb: _xla(qb, k, v, scale), blocks)
    return out.swapaxes(0, 1).reshape(b, lq + pad, n, d)[:, :lq]


def _pallas_tpu(q, k, v, scale):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    out = fa.flash_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), sm_scale=scale)
    return out.swapaxes(1, 2)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, name: str = "") -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over `heads` heads; q [B, Lq, C], k/v [B, Lk, C] -> [B, Lq, C]."""
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    scale = 1.0 / math.sqrt(d)
    kernel = choose_kernel(lq, lk, d, q.dtype)
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d) for t in (q, k, v))
    if kernel == "cudnn":
        out = jax.nn.dot_product_attention(qh, kh, vh, scale=scale, implementation="cudnn")
    elif kernel == "chunked":
        out = _chunked(qh, kh, vh, scale)
    elif kernel == "pallas":
        out = _pallas_tpu(qh, kh, vh, scale)
    else:
        out = _xla(qh, kh, vh, scale)
    log = getattr(_state, "log", None)
    if log is not None:
        log.append({"layer": name, "q_len": lq, "kv_len": lk, "heads": heads, "head_dim": d,
                    "dtype": str(jnp.dtype(q.dtype)), "kernel": kernel})
    return out.reshape(b, lq, c)


class Attention(nn.Module):
    """diffusers' attention block: to_q/to_k/to_v without bias, to_out_0 with bias (names as diffusers Flax)."""
    query_dim: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        dense = lambda name, bias=False: Dense(self.query_dim, use_bias=bias, dtype=self.dtype,  # noqa: E731
                                              param_dtype=self.param_dtype, name=name)
        q = dense("to_q")(x)
        k = dense("to_k")(context)
        v = dense("to_v")(context)
        out = multi_head_attention(q, k, v, self.heads, name="/".join(self.scope.path))
        return dense("to_out_0", bias=True)(out)
