"""Multi-head attention with one kernel choice per call, made from a memory and speed estimate.

PACA at a 64x64 latent attends 4096 queries to 4096 keys per head: the plain kernel's fp32 score matrix is 1 GB for
a CFG pair with 8 heads. On a GPU it must never be materialised; on a CPU materialising it is also the slow way:
a fresh 1 GB buffer costs about 6 ns per element in page faults and memory traffic against about 1 ns for a block
that stays in cache (measured on a 2-core EPYC VM: 4096x4096, 8 heads, CFG pair, fp32: 2.5-2.7 s plain XLA, 1.0 s in
256-query blocks, 2.0 s for PyTorch's SDPA). The choice is made at trace time (`plan_attention`):

- GPU, fp16/bf16, head_dim a multiple of 8 and <= 128: cuDNN flash attention (`jax.nn.dot_product_attention`).
- TPU with sequence lengths that are multiples of 128: the Pallas flash-attention kernel.
- Other accelerator cases (fp32, SD1.5's head_dim 160) with a large score matrix: query-chunked XLA attention
  (`chunked`), whose memory is bounded by the chunk.
- Hosts (CPU) when the full fp32 logits would not stay in cache: `flash`, an online-softmax kernel over
  head-major blocks sized to stay in cache (keys in blocks too when they are many). Small products stay `xla`.
- Everything else: plain XLA attention with fp32 logits and softmax.

`record_kernels()` captures which kernel (and blocks) each layer got, for benchmarks and tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.layers import Dense

IMPLS = ("auto", "xla", "chunked", "flash", "cudnn", "pallas")
# Accelerators off the fused kernels: score matrices with more elements than this per (batch, head) are computed in
# query chunks (1024 x 4096 fp32 = 16 MB per head).
CHUNK_THRESHOLD = 1024 * 1024
QUERY_CHUNK = 1024
# Hosts: the full fp32 logits above this go blockwise (bench/bench_attention.py, CFG pair, 8 heads, fp32, min of 5:
# 1024^2 x 40: 116 vs 274 ms; 256^2 x 160: 26 vs 36 ms; 256 x 77 x 80 (1.2 MB): 2.8 vs 3.4 ms; only below, e.g.
# 16^2 x 160 (32 kB): 0.47 vs 0.30 ms, does the loop's fixed cost win).
FLASH_MIN_BYTES = 1 << 20
# Working set of one flash block: the fp32 logits and probabilities of q_block x kv_block (8 MB each at 512 x 4096).
# Fewer, larger blocks win over cache-sized ones on CPU, since each block is a loop iteration of several XLA
# thunks: one 4096^2 x 40 CFG-pair call (16 heads), 2-vCPU EPYC, min of 4: 64 / 128 / 256 queries slower than
# 512; 256: 450-463 ms, 512: 413-430 ms, 1024: 418-443 ms (bench/bench_attention.py; torch's SDPA: 362-382 ms).
BLOCK_BYTES = 8 << 20
KV_BLOCK_MAX = 8192    # longer key sequences are split into blocks of KV_BLOCK with an online softmax
KV_BLOCK = 4096
MIN_Q_BLOCK = 16
LOGIT_BYTES = 4        # logits and softmax are fp32 whatever the compute dtype

_state = threading.local()


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The kernel for one attention call and what it costs: `full_logits_bytes` is the fp32 score matrix the plain
    kernel would hold (the memory plan's worst case), `working_bytes` the chosen kernel's estimated temporaries."""
    kernel: str
    q_block: int | None
    kv_block: int | None
    full_logits_bytes: int
    working_bytes: int


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


def flash_blocks(q_len: int, kv_len: int) -> tuple[int, int]:
    """(q_block, kv_block) of the flash kernel: keys whole up to KV_BLOCK_MAX, queries filling BLOCK_BYTES.

    A q_block dividing q_len is preferred (no padded rows) when one exists within a factor of two of the target."""
    kv_block = kv_len if kv_len <= KV_BLOCK_MAX else KV_BLOCK
    target = max(MIN_Q_BLOCK, BLOCK_BYTES // (LOGIT_BYTES * kv_block))
    if q_len <= target:
        return q_len, kv_block
    for qb in range(target, target // 2, -1):
        if q_len % qb == 0:
            return qb, kv_block
    return target, kv_block


def plan_attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, dtype: Any,
                   backend: str | None = None) -> AttentionPlan:
    """The kernel for softmax(q k^T) v over [batch, heads] of q_len x kv_len, and its memory estimate."""
    forced = _forced_impl()
    backend = backend or jax.default_backend()
    bh = batch * heads
    full = bh * q_len * kv_len * LOGIT_BYTES
    if forced != "auto":
        kernel = forced
    elif backend in ("gpu", "cuda", "rocm") and backend != "rocm" and _cudnn_ok(head_dim, jnp.dtype(dtype).type):
        kernel = "cudnn"
    elif backend == "tpu" and q_len % 128 == 0 and kv_len % 128 == 0:
        kernel = "pallas"
    elif backend in ("gpu", "cuda", "rocm", "tpu"):
        kernel = "chunked" if q_len * kv_len > CHUNK_THRESHOLD else "xla"
    else:  # hosts: blockwise once the full logits leave the cache
        kernel = "flash" if full > FLASH_MIN_BYTES else "xla"
    q_block = kv_block = None
    if kernel == "flash":
        q_block, kv_block = flash_blocks(q_len, kv_len)
        working = 2 * q_block * kv_block * LOGIT_BYTES  # logits + probabilities of the block in flight
    elif kernel == "chunked":
        q_block, kv_block = min(q_len, QUERY_CHUNK), kv_len
        working = 2 * bh * q_block * kv_len * LOGIT_BYTES
    elif kernel in ("cudnn", "pallas"):
        working = 0  # fused: no score matrix in memory
    else:  # XLA fuses the softmax into one score-sized buffer: the tiny PASD step at 512 px (1.07 GB of logits per
        working = full  # 4096-token call) compiles to 1.24 GB of temporaries in all
    return AttentionPlan(kernel, q_block, kv_block, full, working)


def choose_kernel(q_len: int, kv_len: int, head_dim: int, dtype, backend: str | None = None,
                  batch_heads: int = 1) -> str:
    """The kernel `plan_attention` picks (`batch_heads` = batch x heads of the call)."""
    return plan_attention(batch_heads, 1, q_len, kv_len, head_dim, dtype, backend).kernel


def _xla(q, k, v, scale):
    # q [B, Lq, N, D], k/v [B, Lk, N, D]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def _chunked(q, k, v, scale, chunk=None):
    chunk = chunk or QUERY_CHUNK
    b, lq, n, d = q.shape
    if lq <= chunk:
        return _xla(q, k, v, scale)
    pad = (-lq) % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = qp.reshape(b, (lq + pad) // chunk, chunk, n, d).swapaxes(0, 1)
    out = jax.lax.map(lambda qb: _xla(qb, k, v, scale), blocks)
    return out.swapaxes(0, 1).reshape(b, lq + pad, n, d)[:, :lq]


def _scores(qi, kj, scale):
    return jnp.einsum("qd,kd->qk", qi, kj, preferred_element_type=jnp.float32) * scale


def _flash(q, k, v, scale, q_block: int, kv_block: int):
    """Online-softmax attention over head-major blocks: per (batch, head, query block) one loop iteration whose
    logits stay in cache; keys in one block (exact row softmax) or several (running max and sum, rescaled)."""
    b, lq, n, d = q.shape
    lk = k.shape[1]
    nq, nk = -(-lq // q_block), -(-lk // kv_block)

    def heads_first(t, length, block):
        t = t.transpose(0, 2, 1, 3).reshape(b * n, t.shape[1], d)
        return jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0))).reshape(b * n, length // block, block, d)

    qh = heads_first(q, nq * q_block, q_block).reshape(b * n * nq, q_block, d)
    kh, vh = heads_first(k, nk * kv_block, kv_block), heads_first(v, nk * kv_block, kv_block)
    last_valid = lk - (nk - 1) * kv_block

    def one_block(i):
        qi, kb, vb = qh[i], kh[i // nq], vh[i // nq]
        if nk == 1:
            s = _scores(qi, kb[0], scale)
            p = jnp.exp(s - s.max(axis=-1, keepdims=True))
            o = jnp.einsum("qk,kd->qd", p.astype(v.dtype), vb[0], preferred_element_type=jnp.float32)
            return (o / p.sum(axis=-1, keepdims=True)).astype(v.dtype)

        def kv_step(carry, j):
            m, l, acc = carry
            s = _scores(qi, kb[j], scale)
            valid = jnp.arange(kv_block) < jnp.where(j == nk - 1, last_valid, kv_block)
            s = jnp.where(valid[None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
            p = jnp.exp(s - m_new)
            corr = jnp.exp(m - m_new)
            acc = acc * corr + jnp.einsum("qk,kd->qd", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
            return (m_new, l * corr + p.sum(axis=-1, keepdims=True), acc), None

        init = (jnp.full((q_block, 1), -jnp.inf, jnp.float32), jnp.zeros((q_block, 1), jnp.float32),
                jnp.zeros((q_block, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(kv_step, init, jnp.arange(nk))
        return (acc / l).astype(v.dtype)

    # checkpoint: a backward pass recomputes each block instead of keeping every block's probabilities
    out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(b * n * nq))
    return out.reshape(b, n, nq * q_block, d)[:, :, :lq].transpose(0, 2, 1, 3)


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
    plan = plan_attention(b, heads, lq, lk, d, q.dtype)
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d) for t in (q, k, v))
    if plan.kernel == "cudnn":
        out = jax.nn.dot_product_attention(qh, kh, vh, scale=scale, implementation="cudnn")
    elif plan.kernel == "chunked":
        out = _chunked(qh, kh, vh, scale)
    elif plan.kernel == "flash":
        out = _flash(qh, kh, vh, scale, plan.q_block, plan.kv_block)
    elif plan.kernel == "pallas":
        out = _pallas_tpu(qh, kh, vh, scale)
    else:
        out = _xla(qh, kh, vh, scale)
    log = getattr(_state, "log", None)
    if log is not None:
        log.append({"layer": name, "batch": b, "q_len": lq, "kv_len": lk, "heads": heads, "head_dim": d,
                    "dtype": str(jnp.dtype(q.dtype)), "kernel": plan.kernel, "q_block": plan.q_block,
                    "kv_block": plan.kv_block, "full_logits_bytes": plan.full_logits_bytes,
                    "working_bytes": plan.working_bytes})
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
