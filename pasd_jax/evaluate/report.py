"""The report folder: `metrics.json`, `per_image.csv` (written row by row) and `table.md` (Table 1 layout).

metrics.json, one method: {"mean": {metric: value}, "images": {prediction path: {metric: value}}, "skipped":
[{method, pred, gt, reason}], "metric_errors": [...], "counts": {metric: images scored}, "failed_metrics":
{metric: why}, "not_images": {folder: files ignored for their suffix}, "settings": {...}}. Several methods:
{"methods": {name: <the per-method keys>}, "failed_metrics", "not_images", "settings"}. A value is null where the
metric failed on that image (the reason is in metric_errors); PSNR of identical images is Infinity.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import IO, Any, Sequence

from pasd_jax.evaluate.registry import METRICS, SET_LEVEL
from pasd_jax.evaluate.runner import Evaluation, MethodResult, Values

JSON_NAME, CSV_NAME, TABLE_NAME = "metrics.json", "per_image.csv", "table.md"


class CsvRows:
    """`per_image.csv`, one row per scored pair as soon as it is scored (so nothing is held for thousands)."""

    def __init__(self, path: pathlib.Path, metrics: Sequence[str]):
        self.metrics = [m for m in metrics if METRICS[m].kind != SET_LEVEL]
        self._file: IO[str] = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._writer = csv.writer(self._file)
        self._writer.writerow(["method", "image", *self.metrics])

    def __call__(self, method: str, image: str, values: Values) -> None:
        self._writer.writerow([method, image, *(_cell(values.get(m)) for m in self.metrics)])

    def close(self) -> None:
        self._file.close()


def _cell(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _method_json(r: MethodResult, metrics: Sequence[str]) -> dict[str, Any]:
    return {"mean": {m: r.mean(m) for m in metrics},
            "images": r.images,
            "skipped": r.skipped,
            "metric_errors": r.metric_errors,
            "counts": {m: (1 if r.set_values.get(m) is not None else 0) if METRICS[m].kind == SET_LEVEL
                       else r.count(m) for m in metrics}}


def metrics_json(ev: Evaluation, settings: dict[str, Any]) -> dict[str, Any]:
    methods = {r.name: _method_json(r, ev.metrics) for r in ev.methods}
    shared = {"failed_metrics": ev.failed_metrics, "not_images": ev.not_images, "settings": settings}
    if len(methods) == 1:
        return {**next(iter(methods.values())), **shared}
    return {"methods": methods, **shared}


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "–"
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def markdown_table(ev: Evaluation, dataset: str, settings: dict[str, Any]) -> str:
    """One row per method, one column per metric (arrow = better direction), the best value of each in bold."""
    specs = [METRICS[m] for m in ev.metrics]
    lines = ["| Dataset | Method | " + " | ".join(f"{s.label}{s.arrow}" for s in specs) + " |",
             "|---|---|" + "---:|" * len(specs)]
    best = {}
    for s in specs:
        vals = [round(v, s.digits) for r in ev.methods if (v := r.mean(s.name)) is not None]
        if len(ev.methods) > 1 and vals:
            best[s.name] = max(vals) if s.higher_is_better else min(vals)
    for r in ev.methods:
        cells = []
        for s in specs:
            v = r.mean(s.name)
            text = _fmt(v, s.digits)
            cells.append(f"**{text}**" if v is not None and round(v, s.digits) == best.get(s.name) else text)
        lines.append(f"| {dataset} | {r.name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"PSNR/SSIM/NIQE: crop border {settings['crop_border']}; Y = ITU-R BT.601 luma of YCbCr "
                 "(MATLAB rgb2ycbcr). ↑ higher is better, ↓ lower is better.")
    for r in ev.methods:
        counts = ", ".join(f"{m} {r.count(m)}" for m in ev.metrics if METRICS[m].kind != SET_LEVEL)
        lines.append(f"{r.name}: {len(r.images)} pairs scored ({counts}); {len(r.skipped)} skipped; "
                     f"{len(r.metric_errors)} metric errors.")
    for m, why in ev.failed_metrics.items():
        lines.append(f"{m}: not computed: {why}")
    return "\n".join(lines) + "\n"


def write_summary(out: pathlib.Path, ev: Evaluation, dataset: str, settings: dict[str, Any]) -> None:
    """metrics.json and table.md (the CSV is already written row by row)."""
    (out / JSON_NAME).write_text(json.dumps(metrics_json(ev, settings), indent=1) + "\n", encoding="utf-8")
    (out / TABLE_NAME).write_text(markdown_table(ev, dataset, settings), encoding="utf-8")
