"""Blur kernels of the Real-ESRGAN degradation, from their closed forms, and their random sampling.

Grid convention (as basicsr): for a K x K kernel, entry [i, j] sits at x = j - K//2 (horizontal) and
y = i - K//2 (vertical); Q(x, y) = [x, y] Sigma^-1 [x, y]^T with Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T.
Gaussian exp(-Q/2), generalized Gaussian exp(-Q^beta/2), plateau 1/(1 + Q^beta); all normalised to sum 1.
Kernels are returned unpadded (their true 7..21 size): zero padding to 21 changes no output but costs time.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from scipy import special

from data_pipeline.presets import KERNEL_TYPES, KernelConfig


@functools.lru_cache(maxsize=32)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)  # xx varies along columns
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


def quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Q = [x, y] Sigma^-1 [x, y]^T on the kernel grid, with Sigma^-1 written in closed form."""
    xx, yy = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    a, b = 1.0 / sigma_x**2, 1.0 / sigma_y**2
    # R diag(a, b) R^T with R = [[c, -s], [s, c]]
    i00 = a * c * c + b * s * s
    i11 = a * s * s + b * c * c
    i01 = (a - b) * c * s
    return i00 * xx * xx + 2.0 * i01 * xx * yy + i11 * yy * yy


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    k = np.exp(-0.5 * quadratic_form(size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    k = np.exp(-0.5 * np.power(quadratic_form(size, sigma_x, sigma_y, theta), beta))
    return k / k.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    k = 1.0 / (np.power(quadratic_form(size, sigma_x, sigma_y, theta), beta) + 1.0)
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Circular low-pass: omega_c J1(omega_c r) / (2 pi r), centre omega_c^2 / (4 pi), normalised."""
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * special.j1(omega_c * r) / (2.0 * np.pi * r)
    c = size // 2
    k[c, c] = omega_c**2 / (4.0 * np.pi)
    return k / k.sum()


def gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """The separable factor of an isotropic Gaussian: outer(g, g) == gaussian_kernel(size, s, s, 0)."""
    ax = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-0.5 * ax * ax / sigma**2)
    return g / g.sum()


TRIM_TOL = 1e-9


def trim(k: np.ndarray, tol: float = TRIM_TOL) -> np.ndarray:
    """Drops outer rings of a square (or 1-D) kernel while their total |mass| stays <= tol.

    Exact to float32 on [0, 1] images (tol is 60x below float32's resolution at 1.0), and it sends small-sigma
    kernels to cheap direct filtering. A 1x1 result is kept as is.
    """
    n = k.shape[0]
    c = n // 2
    removed = 0.0
    r = c  # current half-width
    while r > 0:
        if k.ndim == 1:
            ring = abs(float(k[c - r])) + abs(float(k[c + r]))
        else:
            sub = np.abs(k[c - r:c + r + 1, c - r:c + r + 1])
            ring = float(sub.sum() - sub[1:-1, 1:-1].sum())
        if removed + ring > tol:
            break
        removed += ring
        r -= 1
    return k[c - r:c + r + 1] if k.ndim == 1 else k[c - r:c + r + 1, c - r:c + r + 1]


class Kernel(NamedTuple):
    """A sampled kernel; `separable` holds the 1-D factor when the kernel is an isotropic Gaussian."""

    k2d: np.ndarray  # float32, odd size, sums to 1
    separable: np.ndarray | None = None

    @property
    def is_identity(self) -> bool:
        return self.k2d.shape == (1, 1)


IDENTITY = Kernel(np.ones((1, 1), np.float32))


def _beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    # Half the time below 1, half above. For the plateau range (1, 2) the lower half is U(1, 1) == 1
    # exactly: a quirk of the original kept on purpose (it shapes the kernel distribution).
    if rng.random() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def sample_blur_kernel(rng: np.random.Generator, cfg: KernelConfig) -> Kernel:
    """Draws one stage's blur kernel: a sinc with prob `sinc_prob`, else one of the six mixed types."""
    size = int(cfg.sizes[rng.integers(len(cfg.sizes))])
    if rng.random() < cfg.sinc_prob:
        omega = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
        return Kernel(sinc_kernel(size, float(omega)).astype(np.float32))
    kind = KERNEL_TYPES[rng.choice(len(KERNEL_TYPES), p=np.asarray(cfg.type_probs) / np.sum(cfg.type_probs))]
    lo, hi = cfg.sigma_range
    sx = float(rng.uniform(lo, hi))
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sy, theta = sx, 0.0
    else:
        sy, theta = float(rng.uniform(lo, hi)), float(rng.uniform(-np.pi, np.pi))
    if kind == "iso":
        g = trim(gaussian_1d(size, sx), TRIM_TOL / 2)  # the 2-D loss is at most twice the 1-D one
        return Kernel(np.outer(g, g).astype(np.float32), g.astype(np.float32))
    if kind == "aniso":
        k = gaussian_kernel(size, sx, sy, theta)
    elif kind.startswith("generalized"):
        k = generalized_gaussian_kernel(size, sx, sy, theta, _beta(rng, cfg.betag_range))
    else:
        k = plateau_kernel(size, sx, sy, theta, _beta(rng, cfg.betap_range))
    return Kernel(trim(k).astype(np.float32))


def sample_final_sinc(rng: np.random.Generator, prob: float, sizes: tuple[int, ...]) -> Kernel:
    """The final sinc filter with prob `prob` (cutoff U(pi/3, pi) for every size), else the identity."""
    if rng.random() < prob:
        size = int(sizes[rng.integers(len(sizes))])
        return Kernel(sinc_kernel(size, float(rng.uniform(np.pi / 3, np.pi))).astype(np.float32))
    return IDENTITY
