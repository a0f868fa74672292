"""Run monitoring: one JSON object per logged step in `metrics.jsonl`, TensorBoard events, a progress bar, and
the bad training records by name in `bad_data.jsonl`.

Only process 0 writes the metrics. The JSON files are appended to, so a resumed run continues the same files;
readers keep the last row of a step if a crash made a step appear twice. Each host names the bad records of its
own data shard (`bad_data.jsonl` on process 0, `bad_data.process_N.jsonl` on the others).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping

METRICS_FILE = "metrics.jsonl"
BAD_DATA_FILE = "bad_data.jsonl"
TB_DIR = "tb"
SHOWN_PER_KIND = 3


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


class BadDataLog:
    """Every skipped record as a line of `bad_data.jsonl` ({step, reason, record, detail}); the first few of each
    reason also as a message, so a run's log names the files behind its `skipped/*` counts."""

    def __init__(self, workdir: str | os.PathLike, message: Callable[[str], None], *, process_index: int = 0):
        suffix = "" if process_index == 0 else f".process_{process_index}"
        self.path = pathlib.Path(workdir) / BAD_DATA_FILE.replace(".jsonl", f"{suffix}.jsonl")
        self.message = message
        self.shown: dict[str, int] = {}

    def add(self, step: int, records: list[Mapping[str, str]]) -> None:
        if not records:
            return
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps({"step": int(step), **r}) + "\n")
        for r in records:
            n = self.shown.get(r["reason"], 0)
            self.shown[r["reason"]] = n + 1
            if n < SHOWN_PER_KIND:
                self.message(f"skipped a bad training record ({r['reason']}) at step {step}: {r['record']}"
                             + (f" ({r['detail']})" if r.get("detail") else ""))
            elif n == SHOWN_PER_KIND:
                self.message(f"further {r['reason']} records are listed only in {self.path}")
