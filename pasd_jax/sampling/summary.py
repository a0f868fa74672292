"""What a folder run did, told truthfully: written, skipped (and why), failed (and why), how long it took.

The same record is printed as a few lines and written as `<output>/summary.json` at the end of a run and after a
SIGTERM, so a restarted or parallel run, or a script, can see what happened without parsing logs.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

from pasd_jax.safe_write import atomic_write

SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class Summary:
    written: list[str] = dataclasses.field(default_factory=list)
    existing: list[str] = dataclasses.field(default_factory=list)   # output already there when the run started
    appeared: list[str] = dataclasses.field(default_factory=list)   # output written meanwhile by another run
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    pending: int = 0              # planned but not reached (a run stopped by a signal)
    sampling_s: float = 0.0       # wall time from the first batch to the last write
    first_image_s: float | None = None  # from the first batch to the first written image (compile included)
    interrupted: str | None = None      # the signal that stopped the run
    processes: int = 1
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def seconds_per_image(self) -> float | None:
        return self.sampling_s / len(self.written) if self.written else None

    def report(self) -> str:
        parts = [f"{len(self.written)} written"]
        if self.existing:
            parts.append(f"{len(self.existing)} skipped (output exists; --overwrite to redo)")
        if self.appeared:
            parts.append(f"{len(self.appeared)} skipped (output appeared meanwhile: another run wrote it)")
        parts.append(f"{len(self.failed)} failed")
        if self.pending:
            parts.append(f"{self.pending} not reached")
        line = ", ".join(parts)
        if self.seconds_per_image is not None:
            line += f"; {self.seconds_per_image:.2f} s per image"
        if self.interrupted:
            line += f"; stopped by {self.interrupted}: run the same command to finish the rest"
        return "\n".join([line] + [f"  FAILED {rel}: {msg}" for rel, msg in self.failed])

    def to_json(self) -> dict[str, Any]:
        return {"written": len(self.written), "skipped_existing": len(self.existing),
                "skipped_appeared": len(self.appeared), "failed": len(self.failed), "not_reached": self.pending,
                "status": f"interrupted by {self.interrupted}" if self.interrupted else "finished",
                "seconds_sampling": round(self.sampling_s, 3),
                "seconds_per_image": None if self.seconds_per_image is None else round(self.seconds_per_image, 4),
                "seconds_to_first_image": None if self.first_image_s is None else round(self.first_image_s, 3),
                "processes": self.processes, "started": self.started,
                "files": {"written": self.written, "skipped_existing": self.existing,
                          "skipped_appeared": self.appeared,
                          "failed": [{"file": rel, "reason": msg} for rel, msg in self.failed]}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Summary":
        files = data["files"]
        status = data.get("status", "finished")
        return cls(written=list(files["written"]), existing=list(files["skipped_existing"]),
                   appeared=list(files["skipped_appeared"]),
                   failed=[(f["file"], f["reason"]) for f in files["failed"]], pending=int(data["not_reached"]),
                   sampling_s=float(data["seconds_sampling"]), first_image_s=data.get("seconds_to_first_image"),
                   interrupted=status[len("interrupted by "):] if status.startswith("interrupted by ") else None,
                   processes=int(data.get("processes", 1)), started=float(data.get("started", time.time())))


def merge(parts: list[Summary]) -> Summary:
    """One summary of several processes' parts (each process sampled its own share of the files)."""
    out = Summary(processes=len(parts), started=min(p.started for p in parts))
    for p in parts:
        out.written += p.written
        out.existing += p.existing
        out.appeared += p.appeared
        out.failed += p.failed
        out.pending += p.pending
        out.interrupted = out.interrupted or p.interrupted
    out.sampling_s = max(p.sampling_s for p in parts)  # the processes ran side by side
    firsts = [p.first_image_s for p in parts if p.first_image_s is not None]
    out.first_image_s = min(firsts) if firsts else None
    return out


def write_summary(summary: Summary, folder: pathlib.Path, name: str = SUMMARY_FILE) -> pathlib.Path:
    """`folder/name`, written atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary.to_json(), indent=1)
    return atomic_write(folder / name, lambda tmp: tmp.write_text(text))
