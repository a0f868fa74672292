"""The op-by-op parity cases between data_pipeline and PASD's official torch ops: one list, two runners.

`build_cases` makes fixed inputs and parameters; `official` runs PASD's basicsr op on a case (torch, only in the
separate torch venv) and `ours` the data_pipeline op (numpy only). `make_op_refs.py` stores inputs, parameters,
official outputs and the random fields the official ops drew in `tests/data/degradation_op_refs.npz`;
`tests/test_degradation_op_refs.py` replays `ours` against it without torch; `check_ops.py` runs both live.

Random ops are compared with the official draws injected: the Gaussian field torch drew replaces our normal
draws, the Poisson counts torch drew replace our inverse-CDF sampler (tested against the Poisson law in
`tests/test_data_ops.py`), so everything around the draw (scaling, grey path, level counting, clipping) is compared.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np

KERNEL_FAMILIES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc")
KINDS = ("kernel", "blur", "resize_by", "resize_to", "gaussian_noise", "poisson_noise", "jpeg", "quantise")
MODES = ("area", "bilinear", "bicubic")


@dataclasses.dataclass
class Case:
    name: str
    kind: str
    params: dict[str, Any]  # JSON scalars; params["input"] names an image of the image dict, when the op takes one
    field: np.ndarray | None = None  # the random field the official op drew (filled by `official`)


# ------------------------------------------------------------------------------------------------ inputs


def build_images(shapes: tuple[tuple[int, int], ...], seed: int = 0) -> dict[str, np.ndarray]:
    """HxWx3 float32 inputs: per shape, uniform noise `u{i}`, a smooth image with texture `s{i}` (JPEG-like
    content), one with 20 distinct levels `l{i}` (Poisson normaliser 32, not 256) and its grey version `g{i}`,
    an 8-bit one `q{i}`
    (as the GT enters), an 8x6 corner of `u{i}` for integer up-scales, and `t`: values around the 8-bit
    rounding ties and outside [0, 1]."""
    rng = np.random.default_rng(seed)
    imgs = {}
    for i, (h, w) in enumerate(shapes):
        u = rng.random((h, w, 3), dtype=np.float32)
        imgs[f"u{i}"] = u
        ramp = np.sin(np.arange(w) / 7.0)[None, :, None] + np.cos(np.arange(h) / 5.0)[:, None, None]
        s = rng.random((h, w, 3), dtype=np.float32) * 0.4 + 0.3 + 0.15 * ramp
        imgs[f"s{i}"] = np.clip(s, 0, 1).astype(np.float32)
        imgs[f"l{i}"] = (np.round(u * 19) / np.float32(19)).astype(np.float32)
        imgs[f"g{i}"] = np.repeat(imgs[f"l{i}"][:, :, :1], 3, axis=2)  # grey, so its luma has ~20 levels too
        imgs[f"q{i}"] = (rng.integers(0, 256, (h, w, 3)).astype(np.float32) / np.float32(255)).astype(np.float32)
        imgs[f"c{i}"] = np.ascontiguousarray(u[:8, :6])
    ties = (np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(255)
    t = np.concatenate([ties, rng.uniform(-0.1, 1.1, 256 * 2).astype(np.float32)])
    imgs["t"] = t.reshape(16, 16, 3)
    return imgs


def build_cases(shapes: tuple[tuple[int, int], ...] = ((32, 32), (24, 40)), seed: int = 0,
                kernel_draws: int = 3) -> tuple[dict[str, np.ndarray], list[Case]]:
    """The fixed inputs and the case list (parameters drawn from `seed`, then rounded to float32 values where
    the official code holds them in float32 tensors)."""
    rng = np.random.default_rng(seed + 1)
    imgs = build_images(shapes, seed)
    cases: list[Case] = []
    f32 = lambda v: float(np.float32(v))  # noqa: E731

    def kernel_params(family: str, size: int) -> dict[str, Any]:
        if family == "sinc":
            lo = np.pi / 3 if size < 13 else np.pi / 5
            return {"family": family, "size": size, "omega": float(rng.uniform(lo, np.pi))}
        p = {"family": family, "size": size, "sx": float(rng.uniform(0.2, 3.0))}
        if family.endswith("aniso"):
            p.update(sy=float(rng.uniform(0.2, 3.0)), theta=float(rng.uniform(-np.pi, np.pi)))
        if family.startswith(("generalized", "plateau")):
            p["beta"] = float(rng.uniform(0.5, 4.0) if family.startswith("generalized") else rng.uniform(1.0, 2.0))
        return p

    sizes = (7, 9, 11, 13, 15, 17, 19, 21)
    for family in KERNEL_FAMILIES:
        for j in range(kernel_draws):
            size = int(sizes[(KERNEL_FAMILIES.index(family) * kernel_draws + j) % len(sizes)])
            cases.append(Case(f"kernel/{family}/{j}", "kernel", kernel_params(family, size)))

    # blur: the direct (<= 11 taps), FFT (>= 13) and separable paths; 21 taps need H, W > 10 (torch's pad)
    blur_kernels = ({"family": "aniso", "size": 7, "sx": 1.8, "sy": 0.6, "theta": 0.7},
                    {"family": "generalized_aniso", "size": 11, "sx": 2.2, "sy": 1.3, "theta": -1.1, "beta": 0.7},
                    {"family": "plateau_aniso", "size": 13, "sx": 2.6, "sy": 1.0, "theta": 2.3, "beta": 1.4},
                    {"family": "iso", "size": 21, "sx": 2.9},
                    {"family": "sinc", "size": 21, "omega": 1.1})
    for i, (h, w) in enumerate(shapes):
        first = i == 0  # the first shape gets every variant, the others (non-square, not multiples of 16) a subset
        for kp in blur_kernels if first else blur_kernels[2:4]:
            cases.append(Case(f"blur/{kp['family']}{kp['size']}/{i}", "blur", {**kp, "input": f"u{i}"}))
        for mode in MODES:
            for s in (0.3, 0.73, 1.234) if first else (0.4567, 1.15):
                cases.append(Case(f"resize_by/{mode}/{s}/{i}", "resize_by",
                                  {"scale": s, "mode": mode, "input": f"u{i}"}))
            sizes_to = [(h // 2, w // 2), (max(h * 3 // 7, 1), max(w * 5 // 9, 1))] + [(h + 5, w + 3)] * first
            for oh, ow in sizes_to:
                cases.append(Case(f"resize_to/{mode}/{oh}x{ow}/{i}", "resize_to", {"h": oh, "w": ow, "mode": mode,
                                                                                  "input": f"u{i}"}))
            if first:  # an integer up-scale, as the final 128 -> 512 resize back
                cases.append(Case(f"resize_to/{mode}/x4/{i}", "resize_to", {"h": 32, "w": 24, "mode": mode,
                                                                            "input": f"c{i}"}))
        for gray in (False, True) if first else (True,):
            cases.append(Case(f"gaussian_noise/{'gray' if gray else 'colour'}/{i}", "gaussian_noise",
                              {"sigma": f32(rng.uniform(1, 15)), "gray": gray, "input": f"u{i}"}))
        for gray, src in ((False, "u"), (False, "q"), (True, "g")) if first else ((True, "u"), (False, "l")):
            cases.append(Case(f"poisson_noise/{'gray' if gray else 'colour'}/{src}/{i}", "poisson_noise",
                              {"scale": f32(rng.uniform(0.05, 2.0)), "gray": gray, "input": f"{src}{i}"}))
        for q in (61.3,) if first else (35.0, 61.3, 95.0, 99.7):
            cases.append(Case(f"jpeg/{q}/{i}", "jpeg", {"quality": f32(q), "input": f"s{i}"}))
        cases.append(Case(f"jpeg/u/{i}", "jpeg", {"quality": f32(rng.uniform(60, 95)), "input": f"u{i}"}))
    cases.append(Case("quantise/t", "quantise", {"input": "t"}))
    return imgs, cases


# ------------------------------------------------------------------------------------------------ ours


def our_kernel_2d(p: dict[str, Any]) -> np.ndarray:
    """The float64 kernel from our closed forms (iso types with sy = sx, theta = 0, as the sampler draws them)."""
    from data_pipeline import kernels

    fam, size = p["family"], p["size"]
    if fam == "sinc":
        return kernels.sinc_kernel(size, p["omega"])
    if fam == "iso":
        g = kernels.gaussian_1d(size, p["sx"])
        return np.outer(g, g)
    sx = p["sx"]
    sy, th = (p["sy"], p["theta"]) if fam.endswith("aniso") else (sx, 0.0)
    if fam == "aniso":
        return kernels.gaussian_kernel(size, sx, sy, th)
    if fam.startswith("generalized"):
        return kernels.generalized_gaussian_kernel(size, sx, sy, th, p["beta"])
    return kernels.plateau_kernel(size, sx, sy, th, p["beta"])


def our_blur_kernel(p: dict[str, Any]):
    """The `Kernel` our sampler builds for these parameters: trimmed, float32, separable for iso Gaussians
    (mirrors the post-processing in `kernels.sample_blur_kernel`)."""
    from data_pipeline import kernels

    if p["family"] == "sinc":
        return kernels.Kernel(our_kernel_2d(p).astype(np.float32))
    if p["family"] == "iso":
        g = kernels.trim(kernels.gaussian_1d(p["size"], p["sx"]), kernels.TRIM_TOL / 2)
        return kernels.Kernel(np.outer(g, g).astype(np.float32), g.astype(np.float32))
    return kernels.Kernel(kernels.trim(our_kernel_2d(p)).astype(np.float32))


class _InjectedNormal:
    """Stands in for the generator `noise.gaussian_noise` draws from: returns the official field."""

    def __init__(self, field: np.ndarray):
        self.field = field

    def standard_normal(self, shape, dtype=np.float64):
        if tuple(shape) != self.field.shape:
            raise AssertionError(f"our noise asks for {tuple(shape)}, the official field is {self.field.shape}")
        return self.field.astype(dtype, copy=True)


class _InjectedCounts:
    """Stands in for `noise.poisson_table(vals)`: returns the official Poisson counts."""

    def __init__(self, counts: np.ndarray):
        self.counts = counts

    def __call__(self, vals: int) -> "_InjectedCounts":
        self.vals = vals
        return self

    def sample(self, rng, levels: np.ndarray) -> np.ndarray:
        if levels.shape != self.counts.shape:
            raise AssertionError(f"our levels are {levels.shape}, the official counts {self.counts.shape}")
        return self.counts.astype(np.float32, copy=True)


@contextmanager
def _injected_counts(counts: np.ndarray):
    from data_pipeline import noise

    with mock.patch.object(noise, "poisson_table", _InjectedCounts(counts)):
        yield


def ours(case: Case, imgs: dict[str, np.ndarray]) -> np.ndarray:
    """data_pipeline's result for `case` (numpy only)."""
    from data_pipeline import noise, resize
    from data_pipeline.degradation import blur, quantise
    from data_pipeline.diffjpeg import diff_jpeg

    p = case.params
    x = imgs[p["input"]].copy() if "input" in p else None
    if case.kind == "kernel":
        return our_kernel_2d(p)
    if case.kind == "blur":
        return blur(x, our_blur_kernel(p))
    if case.kind == "resize_by":
        return resize.resize_by(x, p["scale"], p["mode"])
    if case.kind == "resize_to":
        return resize.resize_to(x, p["h"], p["w"], p["mode"])
    if case.kind == "gaussian_noise":
        return noise.add_noise(x, noise.gaussian_noise(_InjectedNormal(case.field), x.shape, p["sigma"], p["gray"]))
    if case.kind == "poisson_noise":
        with _injected_counts(case.field):
            return noise.add_noise(x, noise.poisson_noise(None, x, p["scale"], p["gray"]))
    if case.kind == "jpeg":
        return diff_jpeg(x, p["quality"])
    if case.kind == "quantise":
        return quantise(x).astype(np.float32) / np.float32(255.0)
    raise ValueError(f"unknown op kind {case.kind!r}")


# ------------------------------------------------------------------------------------------------ official


def _to_t(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


def _to_n(t) -> np.ndarray:
    return np.ascontiguousarray(t[0].detach().numpy().transpose(1, 2, 0))


def official_kernel(p: dict[str, Any]) -> np.ndarray:
    """basicsr's kernel for the parameters, as `random_mixed_kernels` / PASD's sinc draw call them."""
    from pasd.dataloader.basicsr.data import degradations as odeg

    fam, size = p["family"], p["size"]
    if fam == "sinc":
        return odeg.circular_lowpass_kernel(p["omega"], size, pad_to=False)
    iso = not fam.endswith("aniso")
    sx = p["sx"]
    sy, th = (sx, 0.0) if iso else (p["sy"], p["theta"])
    if fam in ("iso", "aniso"):
        return odeg.bivariate_Gaussian(size, sx, sy, th, isotropic=iso)
    if fam.startswith("generalized"):
        return odeg.bivariate_generalized_Gaussian(size, sx, sy, th, p["beta"], isotropic=iso)
    return odeg.bivariate_plateau(size, sx, sy, th, p["beta"], isotropic=iso)


@contextmanager
def _recording(name: str, calls: list):
    """Records the outputs of `torch.<name>` while the official op runs."""
    import torch

    orig = getattr(torch, name)

    def rec(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append(out.detach().clone())
        return out

    with mock.patch.object(torch, name, rec):
        yield


def official(case: Case, imgs: dict[str, np.ndarray], dtype: str = "float32") -> np.ndarray:
    """PASD's op for `case` (torch CPU); fills `case.field` for the random ops. `dtype="float64"` runs the
    deterministic float ops (blur, resizes) in float64, to measure float32's own rounding."""
    import torch
    import torch.nn.functional as F
    from pasd.dataloader.basicsr.data import degradations as odeg
    from pasd.dataloader.basicsr.utils.diffjpeg import DiffJPEG
    from pasd.dataloader.basicsr.utils.img_process_util import filter2D

    p = case.params
    tdt = getattr(torch, dtype)
    x = _to_t(imgs[p["input"]]).to(tdt) if "input" in p else None
    with torch.no_grad():
        if case.kind == "kernel":
            return official_kernel(p)
        if case.kind == "blur":  # padded to 21 and made a FloatTensor, as PASD's random_kernels does
            pad = (21 - p["size"]) // 2
            k = torch.FloatTensor(np.pad(official_kernel(p), ((pad, pad), (pad, pad))))
            return _to_n(filter2D(x, k.to(tdt)))
        if case.kind == "resize_by":
            return _to_n(F.interpolate(x, scale_factor=p["scale"], mode=p["mode"]))
        if case.kind == "resize_to":
            return _to_n(F.interpolate(x, size=(p["h"], p["w"]), mode=p["mode"]))
        if case.kind in ("gaussian_noise", "poisson_noise"):
            # PASD's random_add_*_pt pass sigma / scale and the grey flag as float32 tensors of shape (b,)
            gray = torch.tensor([1.0 if p["gray"] else 0.0])
            calls: list = []
            if case.kind == "gaussian_noise":
                with _recording("randn", calls):
                    out = odeg.add_gaussian_noise_pt(x, sigma=torch.tensor([p["sigma"]]), gray_noise=gray,
                                                     clip=True, rounds=False)
            else:
                with _recording("poisson", calls):
                    out = odeg.add_poisson_noise_pt(x, scale=torch.tensor([p["scale"]]), gray_noise=gray,
                                                    clip=True, rounds=False)
            # grey: the first draw is the grey field (the colour one is drawn too, then weighted by 0)
            f = calls[0].numpy()
            case.field = np.ascontiguousarray(f.reshape(f.shape[-2:])[:, :, None] if p["gray"]
                                              else f[0].transpose(1, 2, 0))
            return _to_n(out)
        if case.kind == "jpeg":
            jpeger = DiffJPEG(differentiable=False)
            return _to_n(jpeger(torch.clamp(x, 0, 1), quality=torch.tensor([p["quality"]])))
        if case.kind == "quantise":
            return _to_n(torch.clamp((x * 255.0).round(), 0, 255) / 255.0)
    raise ValueError(f"unknown op kind {case.kind!r}")


def jpeg_tie_margin(img: np.ndarray, quality: float) -> float:
    """How far DiffJPEG's coefficient rounding on `img` is from being decided by float32 noise.

    For every quantised DCT coefficient c (luma and 2x2-mean chroma, after black padding to 16): the distance of
    c, computed in float64, to the nearest rounding tie (k + 0.5), over the same c computed in float32. Returns the
    smallest ratio. Where it is near 1, torch and we may round one coefficient differently (seen on 512 px inputs,
    max up to 6e-2); the stored references keep it >= 10, so float32 last-bit differences (BLAS build, CPU) cannot
    flip one.
    """
    from data_pipeline import diffjpeg as dj

    h, w, _ = img.shape
    x = np.pad(img, ((0, -h % 16), (0, -w % 16), (0, 0)))
    factor = dj.quality_to_factor(float(quality))
    d = dj.dct_matrix()
    coefs = {}
    for dt in (np.float32, np.float64):
        ycc = x.astype(dt) @ (255.0 * dj._RGB2YCC).T.astype(dt) - np.array([128.0, 0.0, 0.0], dt)
        out = []
        for c, table in ((0, dj.LUMA_TABLE), (1, dj.CHROMA_TABLE), (2, dj.CHROMA_TABLE)):
            p = ycc[:, :, c]
            if c:
                p = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2).mean(axis=(1, 3), dtype=dt)
            blocks = p.reshape(p.shape[0] // 8, 8, p.shape[1] // 8, 8).transpose(0, 2, 1, 3)
            out.append(((d.astype(dt) @ blocks @ d.T.astype(dt)) / (table * factor).astype(dt)).ravel())
        coefs[dt] = np.concatenate(out)
    c64 = coefs[np.float64]
    tie_dist = np.abs(np.abs(c64 - np.floor(c64)) - 0.5)
    noise = np.abs(coefs[np.float32].astype(np.float64) - c64)
    return float(np.min(tie_dist / np.maximum(noise, 1e-12)))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
