"""Learned metrics (LPIPS, DISTS, MUSIQ, MANIQA, CLIPIQA, QAlign) and FID through pyiqa, behind one adapter.

A scorer is made per metric by a factory (the pyiqa one here; tests inject stand-ins). While a scorer is created
and first used, the functions pyiqa downloads weights through are watched, so that offline a missing file gives
one line naming the metric, the file looked for and where to put it by hand, and the other metrics still run.
pyiqa and torch are imported only here and only when a learned metric is asked for (`pip install 'pasd-jax[eval]'`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pathlib
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pasd_jax.evaluate.errors import LearnedMetricError, MetricDependencyError, MissingWeightsError
from pasd_jax.evaluate.registry import FULL_REFERENCE, SET_LEVEL, MetricSpec

ImageScorer = Callable[[np.ndarray, "np.ndarray | None"], float]   # (pred, gt or None) uint8 RGB -> value
SetScorer = Callable[[pathlib.Path, pathlib.Path], float]           # (pred folder, gt folder) -> value
Factory = Callable[[MetricSpec], Callable[..., float]]


def _url_and_file(url: str, dst: str, *args: Any, **kwargs: Any) -> tuple[str, str]:
    return url, dst


def _url_and_folder(url: str, root: str, *args: Any, **kwargs: Any) -> tuple[str, str]:
    return url, os.path.join(root, os.path.basename(url))


# (module, function, how to read (url, destination file) from its arguments): every way pyiqa fetches weights
DOWNLOAD_HOOKS = (
    ("pyiqa.utils.download_util", "download_url_to_file", _url_and_file),   # pyiqa's own checkpoints
    ("torch.hub", "download_url_to_file", _url_and_file),                  # torchvision backbones
    ("pyiqa.archs.clip_model", "_download", _url_and_folder),             # OpenAI CLIP (CLIPIQA)
)
HF_REPOS = {"qalign": "q-future/one-align"}  # metrics whose weights come from the Hugging Face hub


@dataclasses.dataclass
class Attempt:
    url: str
    path: str
    error: BaseException | None = None


@contextlib.contextmanager
def watch_downloads(hooks: Sequence[tuple[str, str, Callable]] = DOWNLOAD_HOOKS) -> Iterator[list[Attempt]]:
    """Record every download attempted through `hooks` (modules not imported yet are left alone)."""
    attempts: list[Attempt] = []
    patched = []
    for module_name, attr, read in hooks:
        module = sys.modules.get(module_name)
        original = getattr(module, attr, None) if module is not None else None
        if original is None:
            continue

        def wrapper(*args: Any, _original=original, _read=read, **kwargs: Any) -> Any:
            url, path = _read(*args, **kwargs)
            attempt = Attempt(str(url), str(path))
            attempts.append(attempt)
            try:
                return _original(*args, **kwargs)
            except BaseException as e:
                attempt.error = e
                raise

        setattr(module, attr, wrapper)
        patched.append((module, attr, original))
    try:
        yield attempts
    finally:
        for module, attr, original in reversed(patched):
            setattr(module, attr, original)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def explain_failure(spec: MetricSpec, error: BaseException, attempts: Sequence[Attempt]) -> LearnedMetricError:
    """The one-line error for a learned metric that could not be made or run."""
    if isinstance(error, LearnedMetricError):
        return error
    failed = [a for a in attempts if a.error is not None]
    if failed:
        a = failed[-1]
        return MissingWeightsError(
            f"{spec.name}: its weights are not on this machine and the download failed ({_short(a.error)}); "
            f"looked for {a.path}; on a machine with internet download {a.url} and place the file at that path, "
            f"then rerun (the other metrics are computed regardless)")
    if isinstance(error, ImportError):
        return MetricDependencyError(f"{spec.name}: pyiqa needs a package that is not installed ({_short(error)}); "
                                  "pip install 'pasd-jax[eval]'")
    repo = HF_REPOS.get(spec.name)
    if repo and (isinstance(error, OSError) or "huggingface" in str(error).lower()):
        return MissingWeightsError(
            f"{spec.name}: the Hugging Face model {repo} is not in the local cache and cannot be downloaded "
            f"({_short(error)}); on a machine with internet run `huggingface-cli download {repo}` and copy "
            f"models--{repo.replace('/', '--')} into the hub cache here ($HF_HOME/hub, default "
            f"~/.cache/huggingface/hub)")
    return LearnedMetricError(f"{spec.name}: pyiqa failed ({_short(error)})")


class WatchedScorer:
    """A scorer whose creation and first call are watched for downloads, with failures explained."""

    def __init__(self, spec: MetricSpec, factory: Factory, hooks: Sequence = DOWNLOAD_HOOKS):
        self.spec, self._hooks, self._first = spec, hooks, True
        with watch_downloads(hooks) as attempts:
            try:
                self._fn = factory(spec)
            except Exception as e:  # noqa: BLE001 - any failure of a third-party metric becomes a report line
                raise explain_failure(spec, e, attempts) from e

    def __call__(self, *args: Any) -> float:
        with watch_downloads(self._hooks if self._first else ()) as attempts:
            try:
                value = float(self._fn(*args))
            except Exception as e:  # noqa: BLE001
                raise explain_failure(self.spec, e, attempts) from e
        self._first = False
        return value


def _to_tensor(img: np.ndarray) -> Any:
    import torch  # noqa: PLC0415
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0).unsqueeze(0)


def pyiqa_factory(device: str | None = None) -> Factory:
    """Scorers backed by `pyiqa.create_metric` (on `device`, default: CUDA when torch sees it, else CPU).

    pyiqa is imported here, before any scorer is made, so that `watch_downloads` finds its download functions.
    """
    try:
        import pyiqa  # noqa: PLC0415
        import torch  # noqa: PLC0415
    except ImportError as e:
        reason = _short(e)

        def unavailable(spec: MetricSpec) -> Callable[..., float]:
            raise MetricDependencyError(f"{spec.name} needs pyiqa and torch: pip install 'pasd-jax[eval]' ({reason})")

        return unavailable
    for module_name, _, _ in DOWNLOAD_HOOKS:
        with contextlib.suppress(ImportError):
            importlib.import_module(module_name)

    def make(spec: MetricSpec) -> Callable[..., float]:
        metric = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device) if device else None)
        if spec.kind == SET_LEVEL:
            return lambda pred_dir, gt_dir: float(metric(str(pred_dir), str(gt_dir), verbose=False))

        def score(pred: np.ndarray, gt: np.ndarray | None = None) -> float:
            with torch.no_grad():
                if spec.kind == FULL_REFERENCE:
                    out = metric(_to_tensor(pred), _to_tensor(gt))
                else:
                    out = metric(_to_tensor(pred))
            return float(out.detach().float().mean().cpu())

        return score

    return make
