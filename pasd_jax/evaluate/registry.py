"""The metric table: every metric `--metrics` accepts, its direction and who computes it.

Ours (numpy, no torch) follow basicsr 1.4.2; the learned ones and FID come from pyiqa (`pip install
'pasd-jax[eval]'`), which downloads their weights on first use. `table1` is the metric set of PASD's Table 1.
"""
from __future__ import annotations

import dataclasses

from pasd_jax.evaluate.errors import UnknownMetricError

FULL_REFERENCE, NO_REFERENCE, SET_LEVEL = "full-reference", "no-reference", "set-level"
OURS, PYIQA = "ours", "pyiqa"


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str                # the name in --metrics, metrics.json and the CSV
    label: str               # the column header of the Markdown table
    higher_is_better: bool
    kind: str                # FULL_REFERENCE (needs GT), NO_REFERENCE, SET_LEVEL (one value per folder pair)
    backend: str             # OURS or PYIQA
    pyiqa_name: str | None = None
    about: str = ""
    digits: int = 4          # decimals in the Markdown table

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


_TABLE = (
    MetricSpec("psnr", "PSNR", True, FULL_REFERENCE, OURS, about="PSNR (dB) on RGB", digits=2),
    MetricSpec("ssim", "SSIM", True, FULL_REFERENCE, OURS, about="SSIM on RGB, mean over channels"),
    MetricSpec("psnr_y", "PSNR (Y)", True, FULL_REFERENCE, OURS, about="PSNR (dB) on the Y channel of YCbCr",
               digits=2),
    MetricSpec("ssim_y", "SSIM (Y)", True, FULL_REFERENCE, OURS, about="SSIM on the Y channel of YCbCr"),
    MetricSpec("lpips", "LPIPS", False, FULL_REFERENCE, PYIQA, "lpips", "LPIPS (AlexNet, v0.1)"),
    MetricSpec("dists", "DISTS", False, FULL_REFERENCE, PYIQA, "dists", "DISTS"),
    MetricSpec("fid", "FID", False, SET_LEVEL, PYIQA, "fid", "FID between the paired predictions and GTs", 2),
    MetricSpec("musiq", "MUSIQ", True, NO_REFERENCE, PYIQA, "musiq", "MUSIQ (KonIQ-10k)", 2),
    MetricSpec("maniqa", "MANIQA", True, NO_REFERENCE, PYIQA, "maniqa", "MANIQA (KonIQ-10k)"),
    MetricSpec("clipiqa", "CLIPIQA", True, NO_REFERENCE, PYIQA, "clipiqa", "CLIP-IQA"),
    MetricSpec("niqe", "NIQE", False, NO_REFERENCE, OURS, about="NIQE on the Y channel (needs >= two 96x96 blocks)"),
    MetricSpec("qalign", "QAlign", True, NO_REFERENCE, PYIQA, "qalign", "Q-Align quality score (1..5)"),
)
METRICS: dict[str, MetricSpec] = {m.name: m for m in _TABLE}
DEFAULT_METRICS = ("psnr", "ssim", "psnr_y", "ssim_y", "niqe")
ALIASES = {
    "default": DEFAULT_METRICS,
    "table1": ("psnr_y", "ssim_y", "lpips", "fid", "dists", "musiq", "niqe", "qalign"),
    "ours": tuple(m.name for m in _TABLE if m.backend == OURS),
    "all": tuple(METRICS),
}


def parse_metrics(text: str) -> tuple[str, ...]:
    """Comma-separated names and aliases -> metric names in the order given, without repeats."""
    names: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        expanded = ALIASES.get(part, (part,))
        for name in expanded:
            if name not in METRICS:
                raise UnknownMetricError(f"unknown metric {part!r}; known metrics: {', '.join(METRICS)} "
                                         f"(or the sets {', '.join(ALIASES)})")
            if name not in names:
                names.append(name)
    if not names:
        raise UnknownMetricError(f"--metrics is empty; choose from {', '.join(METRICS)}")
    return tuple(names)


def describe() -> str:
    """The table as text, for --help and --list-metrics."""
    rows = [f"  {m.name:<8} {m.arrow} {m.kind:<15} {m.backend:<6} {m.about}" for m in _TABLE]
    sets = [f"  {k}: {','.join(v)}" for k, v in ALIASES.items()]
    return "\n".join(["metrics (↑ higher is better, ↓ lower is better):", *rows, "sets:", *sets])
