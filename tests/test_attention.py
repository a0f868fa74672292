"""The attention dispatcher: every kernel computes the same thing, and the choice rules hold per backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.models import attention as A


def _qkv(lq=300, lk=270, c=64, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (2, lq, c), dtype), jax.random.normal(ks[1], (2, lk, c), dtype),
            jax.random.normal(ks[2], (2, lk, c), dtype))


def _reference(q, k, v, heads):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(b, lq, c)


def _small_blocks(monkeypatch):
    """Blocks small enough that 300 queries x 270 keys take several query blocks (ragged last one) and, for flash,
    several key blocks with a masked ragged last one."""
    monkeypatch.setattr(A, "QUERY_CHUNK", 64)
    monkeypatch.setattr(A, "BLOCK_BYTES", 64 * 128 * A.LOGIT_BYTES)  # 64-query blocks against 128 keys
    monkeypatch.setattr(A, "KV_BLOCK_MAX", 200)
    monkeypatch.setattr(A, "KV_BLOCK", 128)


@pytest.mark.parametrize("impl", ["xla", "chunked", "flash"])
def test_kernels_match_float64_reference(impl, monkeypatch):
    _small_blocks(monkeypatch)
    q, k, v = _qkv()
    with A.attention_impl(impl), A.record_kernels() as log:
        out = A.multi_head_attention(q, k, v, heads=8, name="probe")
    err = float(np.abs(np.asarray(out, np.float64) - _reference(q, k, v, 8)).max())
    print(f"\n{impl}: max abs err vs float64 {err:.2e}")
    # fp32 rounding of 8-dim dots and 270-term sums: measured 5.4e-7 for each kernel
    assert err < 2e-6
    (entry,) = log
    assert {k: entry[k] for k in ("layer", "batch", "q_len", "kv_len", "heads", "head_dim", "dtype", "kernel")} == {
        "layer": "probe", "batch": 2, "q_len": 300, "kv_len": 270, "heads": 8, "head_dim": 8, "dtype": "float32",
        "kernel": impl}
    if impl == "flash":
        assert (entry["q_block"], entry["kv_block"]) == (60, 128)  # 5 query blocks (60 divides 300) x 3 key blocks


def test_flash_single_key_block_and_divisor_blocks(monkeypatch):
    """Keys in one block (exact row softmax) with a query block that divides the length (no padded rows)."""
    monkeypatch.setattr(A, "BLOCK_BYTES", 100 * 270 * A.LOGIT_BYTES)
    assert A.flash_blocks(300, 270) == (100, 270)
    q, k, v = _qkv()
    with A.attention_impl("flash"):
        out = jax.jit(lambda q, k, v: A.multi_head_attention(q, k, v, heads=4))(q, k, v)
    err = float(np.abs(np.asarray(out, np.float64) - _reference(q, k, v, 4)).max())
    print(f"\nflash, one key block: max abs err vs float64 {err:.2e}")
    assert err < 2e-6  # measured 4.3e-7


def test_flash_bf16_and_gradient_match_xla(monkeypatch):
    _small_blocks(monkeypatch)
    q, k, v = _qkv(dtype=jnp.bfloat16)
    outs = {}
    for impl in ("xla", "flash"):
        with A.attention_impl(impl):
            outs[impl] = np.asarray(A.multi_head_attention(q, k, v, heads=8), np.float64)
    ref = _reference(q, k, v, 8)
    errs = {i: float(np.abs(o - ref).max()) for i, o in outs.items()}
    print(f"\nbf16 max abs err vs float64: {errs}")
    # both round the probabilities and the output to bf16 (8 bits): measured xla 2.7e-3, flash 2.2e-3
    assert errs["flash"] <= 1.5 * errs["xla"] + 1e-3

    q, k, v = _qkv()
    grads = {}
    for impl in ("xla", "flash"):
        with A.attention_impl(impl):
            loss = lambda q, k, v: jnp.sum(jnp.sin(A.multi_head_attention(q, k, v, heads=8)))  # noqa: E731
            grads[impl] = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    gerr = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(grads["xla"], grads["flash"]))
    print(f"flash vs xla gradient max abs diff {gerr:.2e}")
    assert gerr < 1e-5  # fp32 summation order only: measured 1.9e-6


def test_choice_rules():
    bf16, f32 = jnp.bfloat16, jnp.float32
    # SD1.5 at 512 px: PACA at 64x64 has head_dim 40 -> cuDNN; 1280-channel levels have head_dim 160.
    assert A.choose_kernel(4096, 4096, 40, bf16, backend="gpu") == "cudnn"
    assert A.choose_kernel(4096, 4096, 40, bf16, backend="gpu", batch_heads=16) == "cudnn"
    assert A.choose_kernel(4096, 77, 40, bf16, backend="gpu") == "cudnn"
    assert A.choose_kernel(256, 256, 160, bf16, backend="gpu") == "xla"
    assert A.choose_kernel(4096, 4096, 160, bf16, backend="gpu") == "chunked"
    assert A.choose_kernel(4096, 4096, 40, f32, backend="gpu") == "chunked"  # fp32: never the full matrix
    assert A.choose_kernel(4096, 4096, 40, bf16, backend="tpu") == "pallas"
    assert A.choose_kernel(4096, 77, 40, bf16, backend="tpu") == "xla"
    # hosts: by the size of the full logits (memory and speed), not by backend alone
    assert A.choose_kernel(4096, 4096, 40, f32, backend="cpu", batch_heads=16) == "flash"
    assert A.choose_kernel(4096, 77, 40, f32, backend="cpu", batch_heads=16) == "flash"
    assert A.choose_kernel(16, 16, 160, f32, backend="cpu", batch_heads=16) == "xla"
    plan = A.plan_attention(2, 8, 4096, 4096, 40, f32, backend="cpu")
    assert (plan.q_block, plan.kv_block) == (512, 4096)
    assert plan.full_logits_bytes == 2 * 8 * 4096 * 4096 * 4 and plan.working_bytes == 2 * 512 * 4096 * 4
    long = A.plan_attention(1, 1, 60000, 60000, 512, f32, backend="cpu")  # a 2400x1600 VAE mid-block
    assert long.kernel == "flash" and long.kv_block == A.KV_BLOCK and long.working_bytes <= 2 * A.BLOCK_BYTES
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
    assert log[0]["layer"] == ""  # the top-level module has an empty scope path


def test_golden_unet_with_flash_everywhere(golden_dir):
    """The official tiny PASD ControlNet + UNet step with every attention call on the flash kernel: the same
    tolerance as tests/test_models_golden.py (there the tiny shapes take the xla kernel)."""
    from pasd_jax.convert import from_pytorch
    from pasd_jax.convert.io import load_safetensors

    unet, up = from_pytorch(golden_dir / "tiny_pasd" / "unet")
    cn, cp = from_pytorch(golden_dir / "tiny_pasd" / "controlnet")
    io = load_safetensors(golden_dir / "tiny_pasd" / "inputs_outputs.safetensors")

    def forward(cp, up, sample, t, ehs, cond):
        _, down, mid = cn.apply({"params": cp}, sample, t, ehs, cond, 1.0)
        return unet.apply({"params": up}, sample, t, ehs, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)

    with A.attention_impl("flash"), A.record_kernels() as log:
        pred = jax.jit(forward)(cp, up, io["input.sample"], io["input.timesteps"], io["input.encoder_hidden_states"],
                                io["input.controlnet_cond"])
    assert {e["kernel"] for e in log} == {"flash"} and len(log) == 32
    err = float(np.abs(np.asarray(pred, np.float64) - io["unet.s1.noise_pred"]).max())
    print(f"\ntiny_pasd noise_pred with flash attention: max abs err {err:.2e} (xla kernel, same flags: 1.1e-06)")
    assert err <= 1e-4  # DESIGN.md fp32 parity tolerance; measured 1.01e-6
