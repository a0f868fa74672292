"""The attention dispatcher: every kernel computes the same thing, and the choice rules hold per backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.models import attention as A


def _qkv(lq=300, lk=270, c=64, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (2, lq, c)), jax.random.normal(ks[1], (2, lk, c)),
            jax.random.normal(ks[2], (2, lk, c)))


def _reference(q, k, v, heads):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(b, lq, c)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_kernels_match_float64_reference(impl, monkeypatch):
    monkeypatch.setattr(A, "QUERY_CHUNK", 64)  # several chunks plus a ragged last one
    q, k, v = _qkv()
    with A.attention_impl(impl), A.record_kernels() as log:
        out = A.multi_head_attention(q, k, v, heads=8, name="probe")
    err = float(np.abs(np.asarray(out, np.float64) - _reference(q, k, v, 8)).max())
    print(f"\n{impl}: max abs err vs float64 {err:.2e}")
    assert err < 1e-5
    assert log == [{"layer": "probe", "q_len": 300, "kv_len": 270, "heads": 8, "head_dim": 8,
                    "dtype": "float32", "kernel": impl}]


def test_choice_rules():
    bf16, f32 = jnp.bfloat16, jnp.float32
    # SD1.5 at 512 px: PACA at 64x64 has head_dim 40 -> cuDNN; 1280-channel levels have head_dim 160.
    assert A.choose_kernel(4096, 4096, 40, bf16, backend="gpu") == "cudnn"
    assert A.choose_kernel(4096, 77, 40, bf16, backend="gpu") == "cudnn"
    assert A.choose_kernel(256, 256, 160, bf16, backend="gpu") == "xla"
    assert A.choose_kernel(4096, 4096, 160, bf16, backend="gpu") == "chunked"
    assert A.choose_kernel(4096, 4096, 40, f32, backend="gpu") == "chunked"  # fp32: never the full matrix
    assert A.choose_kernel(4096, 4096, 40, bf16, backend="tpu") == "pallas"
    assert A.choose_kernel(4096, 77, 40, bf16, backend="tpu") == "xla"
    assert A.choose_kernel(4096, 4096, 40, f32, backend="cpu") == "xla"
    with A.attention_impl("chunked"):
        assert A.choose_kernel(64, 64, 40, f32, backend="gpu") == "chunked"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        with A.attention_impl("flash3"):
            pass


def test_module_logs_its_layer_path():
    from pasd_jax.models.attention import Attention

    m = Attention(16, heads=2)
    x, ctx = jnp.ones((1, 5, 16)), jnp.ones((1, 7, 12))
    params = m.init(jax.random.PRNGKey(0), x, ctx)
    with A.record_kernels() as log:
        m.apply(params, x, ctx)
    assert log[0]["kv_len"] == 7 and log[0]["kernel"] == "xla"
