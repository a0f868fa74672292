"""Image operations of the official PASD pre- and post-processing, with the exact semantics parity needs.

- PIL resizes (spec 4.2) run with PIL itself on the host (uint8 HWC numpy in and out): upscale with the PIL default
  filter (bicubic), torchvision `Resize(short side, BILINEAR)` on a PIL image, and the multiple-of-8 crop-by-resize.
- Colour fixes (spec 4.9): the wavelet fix (5 levels, replicate padding, dilated [1,2,1]x[1,2,1]/16 blur, content
  high frequencies + source low frequencies, clamp, then *truncation* to uint8 as torchvision's ToPILImage does) and
  AdaIN; both in jnp, so they can run on the accelerator after decoding, and accept numpy.
- `to_uint8_round`: the diffusers pipeline output, round(clamp(x / 2 + 0.5, 0, 1) * 255).
- `resize_bilinear_no_antialias`: torch `F.interpolate(bilinear, align_corners=False, antialias=False)` in JAX, used
  by the degradation-removal loss in training (spec 1.4); `jax.image.resize` antialiases when downsampling.
- PSNR / SSIM (numpy) for tests and benchmarks.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------------------------
# PIL resizes (host)


def _to_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 HWC RGB image, got {image.dtype} {image.shape}")
    return Image.fromarray(image, mode="RGB")


def pil_resize(image: np.ndarray, size: tuple[int, int], resample: int = Image.BICUBIC) -> np.ndarray:
    """PIL `Image.resize((w, h), resample)` of a uint8 HWC RGB array (PIL's default filter is bicubic)."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ValueError(f"resize target must be at least 1x1, got {w}x{h}")
    return np.asarray(_to_pil(image).resize((w, h), resample=resample))


def short_side_resize_size(w: int, h: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (w, h) of torchvision `Resize(size)` (int size: the short side becomes `size`, long side truncated)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None:
        if max_size <= size:
            raise ValueError(f"max_size = {max_size} must be strictly greater than the requested size {size}")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if w <= h else (new_long, new_short)


def torchvision_resize_short_side(image: np.ndarray, size: int, max_size: int | None = None) -> np.ndarray:
    """torchvision `Resize(size, BILINEAR)` applied to a PIL image: PIL bilinear to the short-side size."""
    h, w = np.asarray(image).shape[:2]
    new_w, new_h = short_side_resize_size(w, h, size, max_size)
    if (new_w, new_h) == (w, h):
        return np.asarray(image)
    return pil_resize(image, (new_w, new_h), Image.BILINEAR)


def processed_size(w: int, h: int, upscale: int = 1, process_size: int = 768,
                   control_type: str = "realisr") -> tuple[int, int]:
    """(w, h) the official preprocessing gives, without touching pixels (spec 4.2).

    realisr: upscale -> if the short side < process_size, short side := process_size -> floor to multiples of 8.
    grayscale: no upscale; the short-side resize always runs, with the long side capped at 2 * process_size.
    """
    upscale, max_size, always = _control_type_rules(control_type, upscale, process_size)
    w, h = int(w) * upscale, int(h) * upscale
    if always or min(w, h) < process_size:
        w, h = short_side_resize_size(w, h, process_size, max_size)
    w8, h8 = w // 8 * 8, h // 8 * 8
    if w8 < 8 or h8 < 8:
        raise ValueError(f"image too small: processed size {w}x{h} is under 8 pixels on a side")
    return w8, h8


def _control_type_rules(control_type: str, upscale: int, process_size: int) -> tuple[int, int | None, bool]:
    """(upscale, max_size, always_resize) of `test_pasd.py` for a control type."""
    if control_type == "realisr":
        return int(upscale), None, False
    if control_type == "grayscale":
        return 1, 2 * int(process_size), True
    raise ValueError(f"control_type must be 'realisr' or 'grayscale', got {control_type!r}")


def preprocess_official(image: np.ndarray, upscale: int = 1, process_size: int = 768,
                        control_type: str = "realisr") -> np.ndarray:
    """The `test_pasd.py` preprocessing of a uint8 HWC RGB image, with PIL's exact filters (spec 4.2)."""
    upscale, max_size, always = _control_type_rules(control_type, upscale, process_size)
    h, w = np.asarray(image).shape[:2]
    x = pil_resize(image, (w * upscale, h * upscale), Image.BICUBIC)  # PIL default filter: bicubic
    if always or min(x.shape[0], x.shape[1]) < process_size:
        x = torchvision_resize_short_side(x, process_size, max_size)
    return pil_resize(x, (x.shape[1] // 8 * 8, x.shape[0] // 8 * 8), Image.BICUBIC)


# ----------------------------------------------------------------------------------------------------------------
# uint8 conversions


@jax.jit
def to_uint8_round(x: Any) -> jnp.ndarray:
    """Pipeline output in [-1, 1] -> uint8: round(clamp(x / 2 + 0.5, 0, 1) * 255) (diffusers, half to even)."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.round(jnp.clip(x / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def to_float01(image: Any) -> jnp.ndarray:
    """uint8 -> float32 in [0, 1] (torchvision ToTensor: x / 255)."""
    return jnp.asarray(image).astype(jnp.float32) / 255.0


def to_uint8_truncate(x: Any) -> jnp.ndarray:
    """float in [0, 1] -> uint8 by clamp, * 255 and truncation (torchvision ToPILImage does not round)."""
    return (jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0) * 255).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Colour fixes (images are [..., H, W, C])

_BLUR_KERNEL = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]).astype(np.float32) / 16.0


@partial(jax.jit, static_argnames=("radius",))
def wavelet_blur(x: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Depthwise 3x3 [1,2,1]x[1,2,1]/16 blur with dilation `radius` and replicate padding `radius`, [..., H, W, C]."""
    x = jnp.asarray(x, jnp.float32)
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    x4 = x.reshape((-1, h, w, c))
    x4 = jnp.pad(x4, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    kernel = jnp.broadcast_to(jnp.asarray(_BLUR_KERNEL)[:, :, None, None], (3, 3, 1, c))
    out = jax.lax.conv_general_dilated(
        x4, kernel, window_strides=(1, 1), padding="VALID", rhs_dilation=(radius, radius),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST)  # no TF32/bf16 passes on accelerators
    return out.reshape(lead + (h, w, c))


@partial(jax.jit, static_argnames=("levels",))
def wavelet_decomposition(x: jnp.ndarray, levels: int = 5) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(high, low): low = 5 successive blurs with radii 1, 2, 4, 8, 16; high accumulates each level's detail."""
    x = jnp.asarray(x)
    high = jnp.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = wavelet_blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


@partial(jax.jit, static_argnames=("levels",))
def wavelet_reconstruction(content: Any, style: Any, levels: int = 5) -> jnp.ndarray:
    """High frequencies of `content` + low frequencies of `style` (float [..., H, W, C], unclamped)."""
    content = jnp.asarray(content, jnp.float32)
    style = jnp.asarray(style, jnp.float32)
    if content.shape != style.shape:
        raise ValueError(f"wavelet colour fix needs equal shapes, got {content.shape} and {style.shape}")
    high, _ = wavelet_decomposition(content, levels)
    _, low = wavelet_decomposition(style, levels)
    return high + low


@jax.jit
def wavelet_color_fix(target: Any, source: Any) -> jnp.ndarray:
    """Official `wavelet_color_fix(target, source)` on uint8 [..., H, W, 3] images; returns uint8 (truncated)."""
    return to_uint8_truncate(wavelet_reconstruction(to_float01(target), to_float01(source)))


@jax.jit
def adain(content: Any, style: Any, eps: float = 1e-5) -> jnp.ndarray:
    """Per-image, per-channel mean/std matching of `content` to `style` (unbiased var + eps), [..., H, W, C]."""
    content = jnp.asarray(content, jnp.float32)
    style = jnp.asarray(style, jnp.float32)

    def stats(x):
        mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
        var = jnp.var(x, axis=(-3, -2), keepdims=True, ddof=1) + eps
        return mean, jnp.sqrt(var)
    s_mean, s_std = stats(style)
    c_mean, c_std = stats(content)
    return (content - c_mean) / c_std * s_std + s_mean


@jax.jit
def adain_color_fix(target: Any, source: Any) -> jnp.ndarray:
    """Official `adain_color_fix(target, source)` on uint8 [..., H, W, 3] images; returns uint8 (truncated)."""
    return to_uint8_truncate(adain(to_float01(target), to_float01(source)))


# ----------------------------------------------------------------------------------------------------------------
# Non-antialiased bilinear resize (torch semantics)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear (align_corners=False) sampling along one axis, float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    l0 = (np.float32(1) - l1).astype(np.float32)
    return i0, i1, l0, l1


@partial(jax.jit, static_argnames=("size", "axes"))
def resize_bilinear_no_antialias(x: Any, size: Sequence[int], axes: tuple[int, int] = (-2, -1)) -> jnp.ndarray:
    """torch `F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)`.

    Two taps per output pixel per axis, whatever the scale: an exact x2 downsample is a 2x2 box mean, x4 and x8
    average the 2 central pixels of each block per axis. `axes` are the (H, W) axes (default NCHW).
    """
    size = tuple(int(n) for n in size)
    x = jnp.asarray(x)
    out = x
    # Width first, then height: torch's order, h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11).
    for axis, n_out in reversed(list(zip(axes, size))):
        axis = axis % x.ndim
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        i0, i1, l0, l1 = _bilinear_taps(n_in, int(n_out))
        bshape = [1] * out.ndim
        bshape[axis] = int(n_out)
        w0 = jnp.asarray(l0, out.dtype).reshape(bshape)
        w1 = jnp.asarray(l1, out.dtype).reshape(bshape)
        out = w0 * jnp.take(out, jnp.asarray(i0), axis=axis) + w1 * jnp.take(out, jnp.asarray(i1), axis=axis)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Metrics (numpy, host): the project's one PSNR/SSIM arithmetic; `pasd_jax.evaluate.psnr_ssim` adds the Real-ISR
# conventions (Y channel, cropped border) and its errors on top, and matches basicsr 1.4.2 to 1e-14.

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all values (inf for identical images)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of [H, W] with the 1-D window g on both axes."""
    k = len(g)
    rows = sum(g[i] * x[i:x.shape[0] - k + 1 + i, :] for i in range(k))
    return sum(g[j] * rows[:, j:rows.shape[1] - k + 1 + j] for j in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), 'valid' region, mean over channels of HWC
    (or HW) images, as basicsr's `calculate_ssim` on RGB."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[0], a.shape[1]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[:2]}")
    g = _gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(a.shape[-1]):
        x, y = a[..., c], b[..., c]
        mx, my = _filter_valid(x, g), _filter_valid(y, g)
        sxx = _filter_valid(x * x, g) - mx * mx
        syy = _filter_valid(y * y, g) - my * my
        sxy = _filter_valid(x * y, g) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        values.append(m.mean())
    return float(np.mean(values))
