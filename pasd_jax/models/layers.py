"""Primitive layers with PyTorch semantics: initialisation, norm statistics and resize rules.

Flax's built-ins differ from PyTorch in exactly the places PASD parity depends on (lecun/zeros init instead of
U(+-1/sqrt(fan_in)), one-pass variance, half-pixel nearest resize), so the few layers the models need are written
here. Parameter names (`kernel`, `bias`, `scale`) and shapes follow Flax conventions, so trees stay identical to
diffusers' Flax models.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Init:
    """A parameter distribution that can be drawn two ways: with a JAX key inside `module.init`, or on the host
    with numpy (`pasd_jax.models.host_init`), which compiles nothing: XLA's CPU compile of one random draw per
    tensor costs tens of milliseconds each, minutes for a full model's init."""
    kind: str  # "uniform": U(-scale, scale); "normal": N(0, scale^2); "constant": every value = scale
    scale: float = 0.0

    def __call__(self, key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -self.scale, self.scale)
        if self.kind == "normal":
            return self.scale * jax.random.normal(key, shape, dtype)
        return jnp.full(shape, self.scale, dtype)

    def host(self, rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
        if self.kind == "uniform":
            return rng.uniform(-self.scale, self.scale, size=tuple(shape)).astype(np.float32)
        if self.kind == "normal":
            return (self.scale * rng.standard_normal(size=tuple(shape))).astype(np.float32)
        return np.full(tuple(shape), self.scale, np.float32)


ZEROS, ONES = Init("constant", 0.0), Init("constant", 1.0)
_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pasd_init_record", default=None)


@contextlib.contextmanager
def recording_inits() -> Iterator[dict[tuple[str, ...], Init]]:
    """Within the block, `param` records {parameter path: its Init} into the yielded dict."""
    record: dict[tuple[str, ...], Init] = {}
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


def param(module: nn.Module, name: str, init: Init, shape: Sequence[int], dtype: Dtype) -> jax.Array:
    """`module.param` that also tells a recording `host_init` which distribution the parameter at this path has."""
    record = _RECORD.get()
    if record is not None:
        record[tuple(module.path) + (name,)] = init
    return module.param(name, init, tuple(shape), dtype)


def torch_uniform(fan_in: int) -> Init:
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    return Init("uniform", 1.0 / math.sqrt(max(fan_in, 1)))


def kaiming_normal_scaled(fan_in: int, gain: float) -> Init:
    """ESRGAN's RRDB init: kaiming-normal (fan_in, ReLU) times `gain`."""
    return Init("normal", gain * math.sqrt(2.0 / max(fan_in, 1)))


def _inits(kind: str, fan_in: int) -> tuple[Init, Init]:
    """(kernel_init, bias_init) by name: "torch" (PyTorch default), "zeros" (zero convs), "rrdb"."""
    if kind == "torch":
        return torch_uniform(fan_in), torch_uniform(fan_in)
    if kind == "zeros":
        return ZEROS, ZEROS
    if kind == "rrdb":
        return kaiming_normal_scaled(fan_in, 0.1), ZEROS
    raise ValueError(f"unknown init {kind!r}")


class Dense(nn.Module):
    """y = x @ kernel + bias, params in `param_dtype`, math in `dtype`."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kinit, binit = _inits(self.init, fan_in)
        kernel = param(self, "kernel", kinit, (fan_in, self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param(self, "bias", binit, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Conv(nn.Module):
    """2-D convolution on NHWC with HWIO kernels and explicit symmetric padding (PyTorch `padding=`)."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | Sequence[tuple[int, int]] = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        cin = x.shape[-1]
        kinit, binit = _inits(self.init, cin * k * k)
        kernel = param(self, "kernel", kinit, (k, k, cin, self.features), self.param_dtype)
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride, self.stride),
            padding=pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = param(self, "bias", binit, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or [B, L, C]) with fp32 two-pass statistics, as PyTorch computes them."""
    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels")
        scale = param(self, "scale", ONES, (c,), self.param_dtype)
        bias = param(self, "bias", ZEROS, (c,), self.param_dtype)
        shape = x.shape
        xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with fp32 two-pass statistics."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = param(self, "scale", ONES, (c,), self.param_dtype)
        bias = param(self, "bias", ZEROS, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """A lookup table (`embedding` [num, features]), as flax's nn.Embed names it, initialised N(0, std^2)."""
    num_embeddings: int
    features: int
    std: float = 0.02
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = param(self, "embedding", Init("normal", self.std), (self.num_embeddings, self.features),
                      self.param_dtype)
        return jnp.take(table, ids, axis=0)


def _torch_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch 'nearest' with an explicit size: src = floor(dst * (in / out)), scale computed in float32.
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest-neighbour resize with PyTorch's index rule (exact repeat for a factor of 2)."""
    h, w = x.shape[1:3]
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = jnp.take(x, jnp.asarray(_torch_nearest_index(h, oh)), axis=1)
    return jnp.take(x, jnp.asarray(_torch_nearest_index(w, ow)), axis=2)
