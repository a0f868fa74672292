"""The evaluation loop: one GT image (and its LQ) at a time, every method's prediction scored against it.

Memory stays at one image per method whatever the folder size; per-image rows go to `on_image` as they are made
(the report streams them to the CSV). Nothing is dropped silently: every pair that cannot be scored is in
`skipped` with the reason, every metric that fails on an image is in `metric_errors`, every learned metric that
cannot be created is in `failed_metrics`, and each is also passed to `warn` when it happens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pasd_jax.evaluate import grid as grid_mod
from pasd_jax.evaluate.errors import EvaluationError, MissingWeightsError, PairingError
from pasd_jax.evaluate.image_read import read_rgb
from pasd_jax.evaluate.learned import DOWNLOAD_HOOKS, Factory, WatchedScorer, pyiqa_factory
from pasd_jax.evaluate.niqe import niqe
from pasd_jax.evaluate.pairing import Folder, match, scan
from pasd_jax.evaluate.psnr_ssim import psnr, ssim
from pasd_jax.evaluate.registry import DEFAULT_METRICS, METRICS, OURS, SET_LEVEL

Values = dict[str, "float | None"]
_OURS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "psnr": lambda p, g, b: psnr(p, g, b),
    "ssim": lambda p, g, b: ssim(p, g, b),
    "psnr_y": lambda p, g, b: psnr(p, g, b, y_channel=True),
    "ssim_y": lambda p, g, b: ssim(p, g, b, y_channel=True),
    "niqe": lambda p, g, b: niqe(p, b),
}


@dataclasses.dataclass(frozen=True)
class Options:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    crop_border: int = 0          # pixels removed from each edge before our metrics (not the learned ones)
    crop_to_gt: bool = False      # crop a larger prediction's top-left to the GT size instead of skipping it
    grid_dir: pathlib.Path | None = None
    grid_crop: tuple[int, int, int] | None = None  # (x, y, size) in GT pixels; None: the most detailed square
    grid_width: int = 256
    progress: bool = True


@dataclasses.dataclass
class MethodResult:
    name: str
    root: pathlib.Path
    images: dict[str, Values] = dataclasses.field(default_factory=dict)  # prediction's relative path -> values
    skipped: list[dict] = dataclasses.field(default_factory=list)
    metric_errors: list[dict] = dataclasses.field(default_factory=list)
    set_values: Values = dataclasses.field(default_factory=dict)          # set-level metrics (FID)

    def count(self, metric: str) -> int:
        return sum(v.get(metric) is not None for v in self.images.values())

    def mean(self, metric: str) -> float | None:
        if metric in self.set_values:
            return self.set_values[metric]
        vals = [v[metric] for v in self.images.values() if v.get(metric) is not None]
        return float(np.mean(vals)) if vals else None


@dataclasses.dataclass
class Evaluation:
    methods: list[MethodResult]
    metrics: tuple[str, ...]
    failed_metrics: dict[str, str]
    not_images: dict[str, int]     # folder -> files ignored because their suffix is not an image's
    grids: int = 0

    @property
    def complete(self) -> bool:
        return not self.failed_metrics and not any(m.skipped or m.metric_errors for m in self.methods)


def _stderr(msg: str) -> None:
    tqdm.write(f"warning: {msg}", file=sys.stderr)


def _make_scorers(metrics: Sequence[str], factory: Factory | None, hooks: Sequence,
                  warn: Callable[[str], None]) -> tuple[dict[str, WatchedScorer], dict[str, str]]:
    learned = [m for m in metrics if METRICS[m].backend != OURS]
    scorers, failed = {}, {}
    if not learned:
        return scorers, failed
    factory = factory or pyiqa_factory()
    for name in learned:
        try:
            scorers[name] = WatchedScorer(METRICS[name], factory, hooks)
        except EvaluationError as e:
            failed[name] = str(e)
            warn(str(e))
    return scorers, failed


def _fit_to_gt(pred: np.ndarray, gt: np.ndarray, crop_to_gt: bool, what: str) -> np.ndarray:
    (ph, pw), (gh, gw) = pred.shape[:2], gt.shape[:2]
    if (ph, pw) == (gh, gw):
        return pred
    if crop_to_gt and ph >= gh and pw >= gw:
        return pred[:gh, :gw]
    if crop_to_gt:
        raise PairingError(f"{what} is {pw}x{ph}, smaller than its {gw}x{gh} ground truth; --crop-to-gt only "
                              "crops larger predictions: resize the results to the GT size")
    raise PairingError(f"{what} is {pw}x{ph} but its ground truth is {gw}x{gh}; pass --crop-to-gt to crop the "
                          "prediction's top-left to the GT size (for outputs padded or rounded up)")


class _SetStage:
    """The evaluated pairs of one method as two folders, for set-level metrics that read folders (FID)."""

    def __init__(self, root: pathlib.Path):
        self.pred, self.gt, self.n = root / "pred", root / "gt", 0
        self.pred.mkdir(parents=True)
        self.gt.mkdir()

    def add(self, pred_path: pathlib.Path, gt_path: pathlib.Path, pred: np.ndarray, cropped: bool) -> None:
        name = f"{self.n:07d}"
        if cropped:
            Image.fromarray(pred).save(self.pred / f"{name}.png")
        else:
            _link(pred_path, self.pred / f"{name}{pred_path.suffix.lower()}")
        _link(gt_path, self.gt / f"{name}{gt_path.suffix.lower()}")
        self.n += 1


def _link(src: pathlib.Path, dst: pathlib.Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _note(values: Values, metrics: Sequence[str]) -> str:
    shown = [f"{m} {values[m]:.4g}" for m in metrics if values.get(m) is not None][:2]
    return "  ".join(shown)


def evaluate(methods: Mapping[str, str | os.PathLike], gt_dir: str | os.PathLike,
             lq_dir: str | os.PathLike | None = None, options: Options = Options(), *,
             factory: Factory | None = None, download_hooks: Sequence = DOWNLOAD_HOOKS,
             on_image: Callable[[str, str, Values], None] | None = None,
             warn: Callable[[str], None] = _stderr) -> Evaluation:
    """Score every method's predictions against the GT folder. `factory` makes learned-metric scorers (pyiqa's
    by default); `on_image(method, prediction path, values)` sees each row as soon as it is computed."""
    gt = scan(gt_dir)
    lq = scan(lq_dir) if lq_dir is not None else None
    lq_pairs = match(lq, gt)[0] if lq is not None else {}
    folders = {name: scan(root) for name, root in methods.items()}
    results = [MethodResult(name, pathlib.Path(root)) for name, root in methods.items()]
    scorers, failed = _make_scorers(options.metrics, factory, download_hooks, warn)
    per_image = [m for m in options.metrics if METRICS[m].kind != SET_LEVEL and m not in failed]
    set_level = [m for m in options.metrics if METRICS[m].kind == SET_LEVEL and m in scorers]

    def skip(result: MethodResult, pred: str | None, gt_rel: str | None, reason: str) -> None:
        result.skipped.append({"method": result.name, "pred": pred, "gt": gt_rel, "reason": reason})
        warn(reason)

    pairings = {}
    for result in results:
        folder = folders[result.name]
        pairs, orphans = match(folder, gt)
        pairings[result.name] = pairs
        for key in orphans:
            rel = folder.rel(folder.files[key])
            if key in gt.ambiguous:
                skip(result, rel, None, f"{result.name}: {rel}: several ground truths share the name {key} ("
                     + ", ".join(gt.rel(p) for p in gt.ambiguous[key]) + "); keep one")
            else:
                skip(result, rel, None, f"{result.name}: {rel} has no ground truth in {gt.root}; name it like its "
                     "GT (same relative path or stem)")
        for key, paths in gt.ambiguous.items():
            if key not in folder.files:
                skip(result, None, gt.rel(paths[0]), f"{result.name}: several ground truths share the name {key} ("
                     + ", ".join(gt.rel(p) for p in paths) + "); keep one")
        for key, paths in folder.ambiguous.items():
            skip(result, folder.rel(paths[0]), None, f"{result.name}: several predictions share the name {key} ("
                 + ", ".join(folder.rel(p) for p in paths) + "); keep one")

    with contextlib.ExitStack() as stack:
        stages = {}
        if set_level:
            tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pasd-eval-")))
            stages = {r.name: _SetStage(tmp / str(i)) for i, r in enumerate(results)}
        n_grids = 0
        keys = sorted(gt.files)
        for key in tqdm(keys, desc="evaluate", unit="image", disable=not options.progress, file=sys.stderr):
            gt_path = gt.files[key]
            gt_rel = gt.rel(gt_path)
            try:
                gt_img = read_rgb(gt_path)
            except EvaluationError as e:
                for result in results:
                    pred_key = pairings[result.name].get(key)
                    pred = folders[result.name].rel(folders[result.name].files[pred_key]) if pred_key else None
                    skip(result, pred, gt_rel, f"{result.name}: ground truth unreadable: {e}")
                continue
            panels = []
            for result in results:
                folder, pred_key = folders[result.name], pairings[result.name].get(key)
                if pred_key is None:
                    skip(result, None, gt_rel, f"{result.name}: no prediction for {gt_rel} in {folder.root}")
                    panels.append(grid_mod.Panel(result.name, None, "missing"))
                    continue
                pred_path = folder.files[pred_key]
                rel = folder.rel(pred_path)
                try:
                    raw = read_rgb(pred_path)
                    pred = _fit_to_gt(raw, gt_img, options.crop_to_gt, f"{result.name}: {rel}")
                except EvaluationError as e:
                    skip(result, rel, gt_rel, str(e) if str(e).startswith(result.name) else f"{result.name}: {e}")
                    panels.append(grid_mod.Panel(result.name, None,
                                                 "wrong size" if isinstance(e, PairingError) else "unreadable"))
                    continue
                values = _score(result, rel, pred, gt_img, per_image, scorers, failed, options.crop_border, warn)
                result.images[rel] = values
                if on_image is not None:
                    on_image(result.name, rel, values)
                if stages:
                    stages[result.name].add(pred_path, gt_path, pred, pred is not raw)
                panels.append(grid_mod.Panel(result.name, pred, _note(values, per_image)))
            if options.grid_dir is not None:
                n_grids += _write_grid(options, key, gt_img, lq, lq_pairs, panels, warn)
        for metric in set_level:
            for result in results:
                _score_set(result, metric, scorers[metric], stages[result.name], warn)
    not_images = {str(f.root): len(f.not_images) for f in [gt, *folders.values()] + ([lq] if lq else [])
                  if f.not_images}
    return Evaluation(results, tuple(options.metrics), failed, not_images, n_grids)


def _score(result: MethodResult, rel: str, pred: np.ndarray, gt: np.ndarray, metrics: Sequence[str],
           scorers: dict[str, WatchedScorer], failed: dict[str, str], border: int,
           warn: Callable[[str], None]) -> Values:
    """Every metric of one pair; a learned metric whose weights turn out missing is dropped for the rest."""
    values: Values = {}
    for m in metrics:
        if m in failed:
            continue
        try:
            values[m] = _OURS[m](pred, gt, border) if m in _OURS else scorers[m](pred, gt)
        except MissingWeightsError as e:
            failed[m] = str(e)
            scorers.pop(m, None)
            warn(str(e))
        except EvaluationError as e:
            values[m] = None
            result.metric_errors.append({"method": result.name, "image": rel, "metric": m, "error": str(e)})
            warn(f"{result.name}: {rel}: {e}")
    return values


def _score_set(result: MethodResult, metric: str, scorer: WatchedScorer, stage: _SetStage,
               warn: Callable[[str], None]) -> None:
    try:
        if stage.n < 2:
            raise EvaluationError(f"{metric} needs at least 2 evaluated pairs, {result.name} has {stage.n}")
        result.set_values[metric] = scorer(stage.pred, stage.gt)
    except EvaluationError as e:
        result.set_values[metric] = None
        result.metric_errors.append({"method": result.name, "image": None, "metric": metric, "error": str(e)})
        warn(f"{result.name}: {e}")


def _write_grid(options: Options, key: str, gt_img: np.ndarray, lq: Folder | None, lq_pairs: Mapping[str, str],
                panels: list, warn: Callable[[str], None]) -> int:
    h, w = gt_img.shape[:2]
    front = []
    if lq is not None:
        lq_key = lq_pairs.get(key)
        try:
            if lq_key is None:
                raise EvaluationError(f"no LQ image for {key} in {lq.root}")
            front = grid_mod.lq_panels(read_rgb(lq.files[lq_key]), (w, h))
        except EvaluationError as e:
            warn(f"grid {key}: {e}")
            front = [grid_mod.Panel("LQ", None, "missing")]
    crop = options.grid_crop or grid_mod.auto_crop(gt_img)
    try:
        picture = grid_mod.comparison([*front, *panels, grid_mod.Panel("GT", gt_img)], crop, options.grid_width)
    except EvaluationError as e:
        warn(f"no grid picture for {key}: {e}")
        return 0
    path = options.grid_dir / f"{key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return 1
