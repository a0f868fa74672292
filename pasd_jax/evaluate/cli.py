"""`python -m pasd_jax.evaluate` / `pasd-evaluate`: score super-resolved folders against ground truth, as in
PASD's Table 1 (PSNR/SSIM on the Y channel, LPIPS, FID, DISTS, MUSIQ, NIQE, QAlign, ...).

  pasd-evaluate --pred results/ --gt DIV2K_val/HR --out report/
  pasd-evaluate --pred PASD=out/pasd --pred SD-x4=out/sdx4 --gt RealSR/HR --lq RealSR/LR \\
      --metrics table1 --crop-border 4 --grid --out report/
  pasd-evaluate sweep --ckpt CKPT --base SD15 --lq RealSR/LR --gt RealSR/HR --levels 100 300 500 700 900 \\
      --out sweep/        (sample at each ANS level and plot fidelity and perceptual quality against it;
                           `pasd-evaluate sweep --help`; `pasd-evaluate report ...` is the first form)

Predictions pair with ground truths by relative path without suffix (`a/0801.png` <-> `a/0801.jpg`), else by a
unique file stem. Each pair is scored and written to per_image.csv as it goes; metrics.json holds the mean, every
image and every skipped pair with its reason; table.md is the Table 1 row of each method (best in bold). A pair
that cannot be scored (no partner, different sizes, unreadable image) is reported, never dropped silently.

PSNR, SSIM and NIQE are computed here in numpy and match basicsr 1.4.2 (`calculate_psnr`, `calculate_ssim`,
`calculate_niqe`); `--crop-border` applies to them. The learned metrics and FID run through pyiqa
(`pip install 'pasd-jax[eval]'`), which downloads their weights on first use; offline, a metric whose weights are
missing is reported with the file to place by hand, and the others still run. FID compares the set of evaluated
predictions with their ground truths.

Exit status: 0 complete; 1 report written but incomplete (skipped pairs, failed metrics or metric errors);
2 nothing written (bad arguments or folders).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import pathlib
import sys
from typing import Any, Sequence

from pasd_jax.errors import PasdError
from pasd_jax.evaluate.errors import EvaluationError
from pasd_jax.evaluate.learned import DOWNLOAD_HOOKS, Factory, pyiqa_factory
from pasd_jax.evaluate.registry import DEFAULT_METRICS, METRICS, PYIQA, describe, parse_metrics
from pasd_jax.evaluate.report import CSV_NAME, JSON_NAME, TABLE_NAME, CsvRows, markdown_table, write_summary
from pasd_jax.evaluate.runner import Evaluation, Options, evaluate
from pasd_jax.safe_write import staged_write


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pasd-evaluate", description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\n" + describe(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", action="append", required=True, metavar="[NAME=]DIR",
                   help="folder of results; repeat for several methods (one table row each); NAME defaults to "
                        "the folder's name")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth images")
    p.add_argument("--lq", metavar="DIR", help="folder of the low-quality inputs (for --grid)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="report folder to create (metrics.json, per_image.csv, table.md, grid/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), metavar="LIST",
                   help="comma-separated metric names or sets, see below (default: %(default)s)")
    p.add_argument("--list-metrics", action="store_true", help="print the metric table and exit")
    p.add_argument("--crop-border", type=int, default=0, metavar="N",
                   help="pixels removed from each edge before PSNR/SSIM/NIQE (Real-ISR papers: the scale, e.g. 4)")
    p.add_argument("--crop-to-gt", action="store_true",
                   help="crop a prediction larger than its GT to the GT size (top-left) instead of skipping it")
    p.add_argument("--dataset", metavar="NAME", help="dataset name in table.md (default: the GT folder's name)")
    p.add_argument("--grid", action="store_true",
                   help="write grid/<image>.png: LQ by nearest and bicubic (with --lq), each result and the GT, "
                        "with the same zoomed crop under each")
    p.add_argument("--grid-crop", metavar="X,Y,SIZE", help="the zoomed square in GT pixels (default: the most "
                                                           "detailed quarter-size square of each image)")
    p.add_argument("--grid-width", type=int, default=256, metavar="PX", help="column width (default: 256)")
    p.add_argument("--device", metavar="DEV", help="torch device for the learned metrics, e.g. cpu, cuda "
                                                    "(default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _methods(specs: Sequence[str]) -> dict[str, pathlib.Path]:
    methods: dict[str, pathlib.Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or "/" in name or "\\" in name or pathlib.Path(spec).exists():
            name, folder = pathlib.Path(spec).resolve().name or spec, spec
        if name in methods:
            raise EvaluationError(f"two --pred folders are both named {name!r}; give them names: --pred NAME=DIR")
        methods[name] = pathlib.Path(folder)
    return methods


def _grid_crop(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        x, y, s = (int(v) for v in text.split(","))
    except ValueError:
        raise EvaluationError(f"--grid-crop {text!r}: expected X,Y,SIZE (three integers, GT pixels)") from None
    if x < 0 or y < 0 or s < 1:
        raise EvaluationError(f"--grid-crop {text!r}: X and Y must be >= 0 and SIZE >= 1")
    return x, y, s


def _versions(metrics: Sequence[str]) -> dict[str, str]:
    names = ["pasd-jax", "numpy", "scipy", "pillow"]
    if any(METRICS[m].backend == PYIQA for m in metrics):
        names += ["pyiqa", "torch"]
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def _check(args: argparse.Namespace) -> None:
    if args.crop_border < 0:
        raise EvaluationError(f"--crop-border must be >= 0, got {args.crop_border}")
    if args.grid_width < 32:
        raise EvaluationError(f"--grid-width must be at least 32 pixels, got {args.grid_width}")
    if (args.grid_crop or args.lq) and not args.grid:
        print("note: --lq and --grid-crop are used by --grid only", file=sys.stderr)
    for flag, folder in [("--gt", args.gt), ("--lq", args.lq)]:
        if folder is not None and not pathlib.Path(folder).is_dir():
            raise EvaluationError(f"{flag} {folder} is not a folder")


def main(argv: Sequence[str] | None = None, *, factory: Factory | None = None,
         download_hooks: Sequence = DOWNLOAD_HOOKS) -> int:
    """Run the evaluation (or with `sweep` first, `sweep.main`); `factory` replaces pyiqa's scorers (tests inject
    stand-ins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from pasd_jax.evaluate import sweep  # noqa: PLC0415 - imports JAX and the sampler, which reports do not need
        return sweep.main(argv[1:], factory=factory, download_hooks=download_hooks)
    if argv[:1] == ["report"]:
        argv = argv[1:]
    if "--list-metrics" in argv:  # before parsing: it needs none of the required folders
        print(describe())
        return 0
    args = _parser().parse_args(argv)
    try:
        _check(args)
        metrics = parse_metrics(args.metrics)
        methods = _methods(args.pred)
        for name, folder in methods.items():
            if not folder.is_dir():
                raise EvaluationError(f"--pred {name}: {folder} is not a folder")
        dataset = args.dataset or pathlib.Path(args.gt).resolve().name
        settings: dict[str, Any] = {
            "pred": {k: str(v) for k, v in methods.items()}, "gt": args.gt, "lq": args.lq, "dataset": dataset,
            "metrics": list(metrics), "crop_border": args.crop_border, "crop_to_gt": args.crop_to_gt,
            "directions": {m: "higher" if METRICS[m].higher_is_better else "lower" for m in metrics},
            "y_channel": "ITU-R BT.601 Y of YCbCr (MATLAB rgb2ycbcr), as basicsr's to_y_channel",
            "versions": _versions(metrics)}
        options = Options(metrics, args.crop_border, args.crop_to_gt, None, _grid_crop(args.grid_crop),
                          args.grid_width, not args.no_progress)
        if factory is None and any(METRICS[m].backend == PYIQA for m in metrics):
            factory = pyiqa_factory(args.device)
        done: list[Evaluation] = []

        def write(tmp: pathlib.Path) -> None:
            rows = CsvRows(tmp / CSV_NAME, metrics)
            try:
                opts = dataclasses.replace(options, grid_dir=tmp / "grid" if args.grid else None)
                ev = evaluate(methods, args.gt, args.lq, opts, factory=factory, download_hooks=download_hooks,
                              on_image=rows)
            finally:
                rows.close()
            write_summary(tmp, ev, dataset, settings)
            done.append(ev)

        out = staged_write(args.out, write, inputs=[*methods.values(), args.gt, args.lq],
                           overwrite=args.overwrite)
    except (PasdError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = done[0]
    print(markdown_table(ev, dataset, settings), end="")
    print(f"report: {out / JSON_NAME}, {out / CSV_NAME}, {out / TABLE_NAME}"
          + (f", {ev.grids} pictures in {out / 'grid'}" if args.grid else ""))
    if not any(r.images for r in ev.methods):
        print("error: no pair could be scored; the reasons are under 'skipped' in metrics.json", file=sys.stderr)
        return 1
    if not ev.complete:
        skipped = sum(len(r.skipped) for r in ev.methods)
        errors = sum(len(r.metric_errors) for r in ev.methods)
        print(f"incomplete: {skipped} pairs skipped, {errors} metric errors, {len(ev.failed_metrics)} metrics not "
              f"computed ({', '.join(ev.failed_metrics) or 'none'}); details in {out / JSON_NAME}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
