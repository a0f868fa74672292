"""Run monitoring: one JSON object per logged step in `metrics.jsonl`, TensorBoard events, a progress bar.

Only process 0 writes. The JSON file is appended to, so a resumed run continues the same file; readers keep the
last row of a step if a crash made a step appear twice.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self.tb = self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(pathlib.Path(workdir) / TB_DIR))
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        for k, v in row.items():
            if k != "step" and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)
        self.tb.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """{step: row} of a run's metrics.jsonl (the last row wins for a repeated step)."""
    out: dict[int, dict[str, float]] = {}
    with open(pathlib.Path(workdir) / METRICS_FILE) as f:
        for line in f:
            row = json.loads(line)
            out[int(row["step"])] = row
    return out
