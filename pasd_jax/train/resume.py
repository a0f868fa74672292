"""Which saved step a run resumes from, and what happens to a step that cannot be read back.

`--resume=latest` (the default) resumes from the newest step; if that step is truncated or damaged the run stops
with one line naming the step and the file, and how to go on. `--resume=latest_intact` resumes from the newest step
that reads, after moving the broken newer ones to `<workdir>/broken_checkpoints/`: they are kept for inspection,
never deleted, and out of reach of Orbax's `max_to_keep` cleanup and of later saves at the same step numbers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from pasd_jax.errors import ConfigError
from pasd_jax.runs.checkpoint import BROKEN, CheckpointReadError, Checkpoints

LATEST, LATEST_INTACT = "latest", "latest_intact"
MODES = (LATEST, LATEST_INTACT)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"resume={mode!r}: expected one of {MODES}")


def newest(reader: Checkpoints | None, read: Callable[[int], Any], mode: str, at_most: int | None = None
           ) -> tuple[int | None, Any, list[CheckpointReadError]]:
    """(step, read(step), errors of the newer steps skipped) under the resume mode; errors carry what to do."""
    if reader is None:
        return None, None, []
    try:
        return reader.newest_readable(read, fallback=mode == LATEST_INTACT, at_most=at_most)
    except CheckpointReadError as e:
        raise e.with_hint(_hint(e, reader, mode)) from None


def _hint(e: CheckpointReadError, reader: Checkpoints, mode: str) -> str:
    if mode == LATEST_INTACT:
        return e.hint or "no step of this run can be read"
    older = sorted((s for s in reader.all_steps() if s < e.step), reverse=True)
    where = reader.directory.parent / BROKEN
    if not older:
        return ("the run has no older step to resume from; nothing was changed on disk (start a new run in another "
                "work dir, or restore the step from a backup)")
    return (f"to resume from the newest step that reads (older steps: {', '.join(map(str, older))}), run the same "
            f"command with --resume=latest_intact: the broken step is then moved to {where}/, never deleted; "
            "nothing was changed on disk")


def set_aside(reader: Checkpoints, broken: list[CheckpointReadError], resumed_from: int) -> list[str]:
    """Move the broken steps out of the checkpoints dir (process 0); one message per step."""
    notes = []
    for e in broken:
        dest = reader.set_aside(e.step) if jax.process_index() == 0 else reader.directory.parent / BROKEN
        notes.append(f"checkpoint step {e.step} cannot be read ({e.where}: {e.reason}); moved it to {dest} (kept, "
                     f"not deleted) and resumed from step {resumed_from}")
    return notes
