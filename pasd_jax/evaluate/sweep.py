"""`pasd-evaluate sweep`: fidelity and perceptual quality against the ANS level on your data (PASD's Fig. 3).

  pasd-evaluate sweep --ckpt runs/pasd/checkpoint-100000 --base checkpoints/stable-diffusion-v1-5 \\
      --lq RealSR/LR --gt RealSR/HR --levels 100 300 500 700 900 --out sweep/

Every LQ image is super-resolved at every level exactly as `pasd-sample --added-noise-level L` would (the same
per-image seeds, preprocessing, prompts and colour fix: `sampling.runner`) into <out>/level_<L>/. The level is a
runtime value of the compiled program, so one compilation per processed image size serves every level. Each level
is then scored against the GT with the report code (<out>/report/: metrics.json, per_image.csv, table.md with one
row per level, and comparison pictures with --grid), and <out>/sweep.json / sweep.png give the fidelity metric
(--fidelity, default psnr_y) and the perceptual one (--perceptual, default niqe; any metric of the table, e.g. a
learned musiq or clipiqa with pyiqa installed) against the level.

Results already in <out>/level_<L>/ are kept: rerun the same command to finish an interrupted sweep, or to score
it again with other metrics without sampling (--overwrite samples again). --upscale defaults to the GT / LQ size
ratio. Exit status: 0 complete; 1 written but incomplete (failed images, skipped pairs or metric errors); 2
nothing done (bad arguments or folders).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Any, Sequence

from PIL import Image

from pasd_jax.errors import PasdError
from pasd_jax.evaluate import sweep_plot
from pasd_jax.evaluate.errors import EvaluationError
from pasd_jax.evaluate.learned import DOWNLOAD_HOOKS, Factory, pyiqa_factory
from pasd_jax.evaluate.pairing import match, scan
from pasd_jax.evaluate.registry import METRICS, PYIQA, parse_metrics
from pasd_jax.evaluate.report import CSV_NAME, CsvRows, markdown_table, write_summary
from pasd_jax.evaluate.runner import Evaluation, Options, evaluate
from pasd_jax.prompts import DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, build_prompt_fn
from pasd_jax.safe_write import atomic_write, refuse_overlap, staged_write
from pasd_jax.sampling import PASDPipeline, SamplingOptions, compile_cache, load_for_sampling, runner, tasks
from pasd_jax.sampling.options import DTYPE_CHOICES, DTYPES, resolve_dtype
from pasd_jax.sampling.plan import Plan, check_output, make_plan
from pasd_jax.schedulers import SCHEDULER_KINDS

PAPER_LEVELS = (100, 300, 500, 700, 900)
JSON_NAME, PLOT_NAME, REPORT_DIR = "sweep.json", "sweep.png", "report"


def level_dir(out: pathlib.Path, level: int) -> pathlib.Path:
    return out / f"level_{level}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pasd-evaluate sweep", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("weights")
    g.add_argument("--ckpt", required=True, help="PASD checkpoint, as for pasd-sample")
    g.add_argument("--base", default=None, help="SD1.5 base (VAE, text encoder, tokenizer, scheduler); optional "
                   "for train.py checkpoints")
    g.add_argument("--cache-dir", default=None, help="converted-weights cache (default ~/.cache/pasd_jax)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the conversion cache")
    g = p.add_argument_group("data")
    g.add_argument("--lq", required=True, metavar="DIR", help="low-quality inputs (searched recursively)")
    g.add_argument("--gt", required=True, metavar="DIR", help="their ground truths (paired by name, as the report)")
    g.add_argument("--levels", type=int, nargs="+", default=list(PAPER_LEVELS), metavar="L",
                   help="ANS levels, timesteps in [0, 999] (default: %(default)s)")
    g.add_argument("--out", required=True, metavar="DIR", help="sweep folder: level_<L>/, report/, sweep.json/png")
    g.add_argument("--overwrite", action="store_true", help="sample again over results already in --out")
    g = p.add_argument_group("sampling (as pasd-sample)")
    g.add_argument("--upscale", type=int, default=None, help="default: the GT / LQ size ratio")
    g.add_argument("--process-size", type=int, default=768)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--scheduler", default="unipc", choices=list(SCHEDULER_KINDS))
    g.add_argument("--guidance-scale", type=float, default=9.0)
    g.add_argument("--conditioning-scale", type=float, default=1.0)
    g.add_argument("--ans-mode", default="paper", choices=["paper", "official"])
    g.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="auto: bfloat16 on GPU/TPU, float32 on CPU (as pasd-sample)")
    g.add_argument("--seed", type=int, default=0, help="per-image seeds derive from this and the relative path")
    g.add_argument("--color-fix", default="wavelet", choices=list(tasks.COLOR_FIXES))
    g.add_argument("--prompt", default="")
    g.add_argument("--added-prompt", default=DEFAULT_ADDED_PROMPT)
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT)
    g.add_argument("--batch-size", type=int, default=0, help="images per call (0: one per device)")
    g.add_argument("--compile-cache", default=None, metavar="DIR", help="persistent XLA compilation cache")
    g.add_argument("--no-compile-cache", action="store_true")
    g = p.add_argument_group("metrics and plot")
    g.add_argument("--fidelity", default="psnr_y", help="metric on the plot's first axis (default: %(default)s)")
    g.add_argument("--perceptual", default="niqe", help="metric on its second axis (default: %(default)s)")
    g.add_argument("--metrics", default="psnr_y,ssim_y", metavar="LIST",
                   help="more metrics for the report besides the two plotted (default: %(default)s); names and "
                   "sets as pasd-evaluate --list-metrics shows")
    g.add_argument("--crop-border", type=int, default=0, metavar="N", help="pixels removed from each edge "
                   "before PSNR/SSIM/NIQE (Real-ISR papers: the scale)")
    g.add_argument("--dataset", metavar="NAME", help="dataset name in table.md and the plot (default: the GT "
                   "folder's name)")
    g.add_argument("--grid", action="store_true", help="report/grid/<image>.png: LQ, every level and the GT")
    g.add_argument("--device", metavar="DEV", help="torch device for learned metrics")
    g.add_argument("--plotter", default="auto", choices=sweep_plot.PLOTTERS,
                   help="auto: matplotlib when installed, else PIL")
    g.add_argument("--no-progress", action="store_true")
    return p


def _levels(values: Sequence[int]) -> list[int]:
    bad = [v for v in values if not 0 <= v <= 999]
    if bad:
        raise EvaluationError(f"--levels {bad}: ANS levels are timesteps in [0, 999]")
    return sorted(set(values))


def infer_upscale(lq_dir: pathlib.Path, gt_dir: pathlib.Path) -> int:
    """The integer GT / LQ size ratio shared by every pair (read from the file headers)."""
    pairs, _ = match(lq := scan(lq_dir), gt := scan(gt_dir))
    if not pairs:
        raise EvaluationError(f"no LQ image in {lq_dir} has a ground truth in {gt_dir}; name them alike "
                              "(same relative path or stem)")
    ratios = {}
    for gt_key, lq_key in pairs.items():
        with Image.open(lq.files[lq_key]) as a, Image.open(gt.files[gt_key]) as b:
            (lw, lh), (gw, gh) = a.size, b.size
        ratio = gw / lw
        ratios.setdefault(int(ratio) if ratio == gh / lh and ratio == int(ratio) else None, []).append(lq_key)
    if None in ratios or len(ratios) != 1:
        raise EvaluationError("the GT / LQ size ratio is not one integer for every pair ("
                              + ", ".join(f"{k or 'not an integer'}: {v[0]}" for k, v in ratios.items())
                              + "); pass --upscale")
    return next(iter(ratios))


def _check(args: argparse.Namespace) -> tuple[list[int], tuple[str, ...]]:
    for flag, folder in [("--lq", args.lq), ("--gt", args.gt)]:
        if not pathlib.Path(folder).is_dir():
            raise EvaluationError(f"{flag} {folder} is not a folder")
    refuse_overlap(args.out, [args.lq, args.gt])
    if args.crop_border < 0:
        raise EvaluationError(f"--crop-border must be >= 0, got {args.crop_border}")
    fidelity, perceptual = parse_metrics(args.fidelity), parse_metrics(args.perceptual)
    if len(fidelity) != 1 or len(perceptual) != 1 or fidelity == perceptual:
        raise EvaluationError(f"--fidelity {args.fidelity} and --perceptual {args.perceptual}: give two different "
                              "metric names, one each")
    metrics = parse_metrics(",".join([*fidelity, *perceptual, args.metrics]))
    return _levels(args.levels), metrics


def _options(args: argparse.Namespace, level: int) -> SamplingOptions:
    return SamplingOptions(steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                           conditioning_scale=args.conditioning_scale, added_noise_level=level,
                           ans_mode=args.ans_mode, dtype=args.dtype)


def _sample(args: argparse.Namespace, plans: dict[int, Plan], settings: runner.RunSettings,
            out: pathlib.Path) -> dict[str, Any]:
    """Every level's plan through one pipeline; returns what sweep.json says about the sampling."""
    cache = False if args.no_cache else args.cache_dir
    loaded = load_for_sampling(args.ckpt, base=args.base, cache=cache, param_dtype=DTYPES[args.dtype])
    for note in loaded.notes:
        logging.info(note)
    pipe = PASDPipeline(loaded.models, loaded.params, loaded.scheduler_config, loaded.tokenizer_dir)
    prompt_fn = build_prompt_fn("none", prompt=args.prompt, added_prompt=args.added_prompt)
    seconds = {}
    for level, plan in plans.items():
        if not plan.pending:
            continue
        print(f"ANS level {level}: sampling {plan.pending} images into {level_dir(out, level)}", file=sys.stderr)
        summary = runner.execute(pipe, _options(args, level), plan, settings, prompt_fn,
                                 progress=not args.no_progress)
        seconds[str(level)] = round(summary.sampling_s, 3)
    return {"programs": dict(pipe.trace_counts), "seconds": seconds, "variant": loaded.variant}


def _series(ev: Evaluation, metric: str) -> sweep_plot.Series:
    spec = METRICS[metric]
    why = ev.failed_metrics.get(metric) or next(
        (e["error"] for r in ev.methods for e in r.metric_errors if e["metric"] == metric), "")
    return sweep_plot.Series(spec.label, spec.higher_is_better, [r.mean(metric) for r in ev.methods], why)


def _sweep_json(levels: list[int], ev: Evaluation, plans: dict[int, Plan], sampled: dict[str, Any],
                fidelity: str, perceptual: str, settings: dict[str, Any]) -> dict[str, Any]:
    def axis(metric: str) -> dict[str, Any]:
        s = _series(ev, metric)
        return {"metric": metric, "label": s.label, "higher_is_better": s.higher_is_better,
                "values": list(s.values), **({"why_missing": s.note} if None in s.values else {})}

    per_level = {}
    for level, r in zip(levels, ev.methods):
        s = plans[level].summary
        per_level[str(level)] = {
            "mean": {m: r.mean(m) for m in ev.metrics}, "scored": len(r.images),
            "sampled": len(s.written), "already_there": len(s.existing), "failed": [list(f) for f in s.failed],
            "skipped_pairs": len(r.skipped), "metric_errors": len(r.metric_errors)}
    return {"levels": levels, "fidelity": axis(fidelity), "perceptual": axis(perceptual), "per_level": per_level,
            "failed_metrics": ev.failed_metrics, "sampling": sampled, "report": f"{REPORT_DIR}/metrics.json",
            "plot": PLOT_NAME, "settings": settings}


def main(argv: Sequence[str] | None = None, *, factory: Factory | None = None,
         download_hooks: Sequence = DOWNLOAD_HOOKS) -> int:
    """Run the sweep; `factory` replaces pyiqa's scorers (tests inject stand-ins)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = pathlib.Path(args.out)
    try:
        levels, metrics = _check(args)
        args.dtype = resolve_dtype(args.dtype)
        fidelity, perceptual = parse_metrics(args.fidelity)[0], parse_metrics(args.perceptual)[0]
        upscale = args.upscale or infer_upscale(pathlib.Path(args.lq), pathlib.Path(args.gt))
        settings = runner.RunSettings(upscale=upscale, process_size=args.process_size, color_fix=args.color_fix,
                                      overwrite=args.overwrite, seed=args.seed, batch_size=args.batch_size,
                                      negative_prompt=args.negative_prompt, task=tasks.SR)
        for level in levels:
            _options(args, level)  # every option checked before any weight is read
        plans = {}
        for level in levels:
            check_output(level_dir(out, level), args.lq)
            plans[level] = make_plan(args.lq, level_dir(out, level), settings)
        if factory is None and any(METRICS[m].backend == PYIQA for m in metrics):
            factory = pyiqa_factory(args.device)
        t0 = time.perf_counter()
        with compile_cache.persistent_cache(args.compile_cache, enabled=not args.no_compile_cache):
            sampled = (_sample(args, plans, settings, out) if any(p.pending for p in plans.values())
                       else {"programs": {}, "seconds": {}, "note": "every result was already there"})
        sampled["total_seconds"] = round(time.perf_counter() - t0, 3)
        methods = {f"level_{level}": level_dir(out, level) for level in levels}
        options = Options(metrics, args.crop_border, False, None, None, 256, not args.no_progress)
        report_settings = {
            "levels": levels, "ckpt": str(args.ckpt), "base": args.base, "lq": args.lq, "gt": args.gt,
            "upscale": upscale, "metrics": list(metrics), "crop_border": args.crop_border,
            "sampling": dataclasses.asdict(_options(args, levels[0])) | {"added_noise_level": "per level"},
            "process_size": args.process_size, "color_fix": args.color_fix, "seed": args.seed,
            "prompt": args.prompt, "added_prompt": args.added_prompt, "negative_prompt": args.negative_prompt,
            "directions": {m: "higher" if METRICS[m].higher_is_better else "lower" for m in metrics}}
        dataset = args.dataset or pathlib.Path(args.gt).resolve().name
        done: list[Evaluation] = []

        def write_report(tmp: pathlib.Path) -> None:
            rows = CsvRows(tmp / CSV_NAME, metrics)
            try:
                opts = dataclasses.replace(options, grid_dir=tmp / "grid" if args.grid else None)
                done.append(evaluate(methods, args.gt, args.lq, opts, factory=factory,
                                     download_hooks=download_hooks, on_image=rows))
            finally:
                rows.close()
            write_summary(tmp, done[0], dataset, report_settings)

        staged_write(out / REPORT_DIR, write_report, inputs=[args.lq, args.gt, *methods.values()], overwrite=True)
    except (PasdError, ValueError, FileNotFoundError) as e:  # ValueError: SamplingOptions / RunSettings
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = done[0]
    record = _sweep_json(levels, ev, plans, sampled, fidelity, perceptual, report_settings)
    atomic_write(out / JSON_NAME, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8"))
    title = (f"ANS level sweep: {dataset}, {max(len(r.images) for r in ev.methods)} images, {args.scheduler} "
             f"{args.steps} steps, x{upscale}")
    used = sweep_plot.plot(out / PLOT_NAME, levels, [_series(ev, fidelity), _series(ev, perceptual)], title,
                           args.plotter)
    print(markdown_table(ev, dataset, report_settings), end="")
    print(f"sweep: {out / JSON_NAME}, {out / PLOT_NAME} ({used}); report: {out / REPORT_DIR}")
    failed = sum(len(p.summary.failed) for p in plans.values())
    if failed or not ev.complete:
        print(f"incomplete: {failed} images failed to sample; {sum(len(r.skipped) for r in ev.methods)} pairs "
              f"skipped, {sum(len(r.metric_errors) for r in ev.methods)} metric errors, metrics not computed: "
              f"{', '.join(ev.failed_metrics) or 'none'}; details in {out / JSON_NAME} and {out / REPORT_DIR}",
              file=sys.stderr)
        return 1
    return 0
