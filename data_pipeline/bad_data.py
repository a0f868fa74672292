"""Bad training records by name: the start-up probe over a random sample, and the names that travel with a batch.

Counting skipped records tells that a data set has bad files, not which: the loader can also hand over, per
element, the records it skipped while making it (`bad_records`: reason, record name, detail), so the trainer can
name them. The probe reads `probe_records` records drawn at random (seeded) and refuses a source only when more
than half of them fail: a mostly good folder whose first and last files are bad trains, a mostly bad one does not.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from pasd_jax.errors import DataError
from pasd_jax.image_io import SkipRecord

log = logging.getLogger(__name__)

MAX_BAD_SHARE = 0.5  # a probe in which more than this share of records fails refuses the source
DETAIL_CHARS = 160


def record_name(source: Any, index: int) -> str:
    """A record's file (or shard member) for messages; `source.record_name(i)` where the source has one."""
    named = getattr(source, "record_name", None)
    return named(index) if named is not None else f"{source!r}#{index}"


def read_record(source: Any, index: int, load) -> Any:
    """`load(source[index])`, with a failure to read the record at all raised as a `read_error` skip."""
    try:
        rec = source[index]
    except (OSError, ValueError) as e:
        raise SkipRecord("read_error", f"{type(e).__name__}: {e}") from None
    return load(rec)


def entry(source: Any, index: int, error: SkipRecord) -> dict[str, str]:
    detail = str(error)
    detail = detail[len(error.reason) + 2:] if detail.startswith(f"{error.reason}: ") else ""
    return {"reason": error.reason, "record": record_name(source, index), "detail": detail[:DETAIL_CHARS]}


def encode(entries: list[dict[str, str]]) -> np.ndarray:
    """One element's bad records as a 0-d string array (batched by Grain like any array)."""
    return np.array(json.dumps(entries) if entries else "")


def decode(batch: Mapping[str, Any]) -> list[dict[str, str]]:
    """The bad records of a batch (empty when the loader was not asked for them)."""
    if "bad_records" not in batch:
        return []
    out = []
    for s in np.asarray(batch["bad_records"]).reshape(-1):
        if str(s):
            out.extend(json.loads(str(s)))
    return out


def probe(source: Any, n_probe: int, min_side: int, load, *, seed: int = 0) -> None:
    """Start-up check of `n_probe` records drawn at random: an empty source, or one where more than half of the
    probed records fail, is a `DataError` now (naming examples), not a stream of skips later."""
    n = len(source)
    if n == 0:
        raise DataError(f"data source {source!r} is empty")
    k = min(n, max(1, int(n_probe)))
    picks = sorted(int(i) for i in np.random.default_rng([seed, n]).choice(n, k, replace=False))
    errors = []
    for i in picks:
        try:
            read_record(source, i, lambda rec: load(rec, min_side))
        except SkipRecord as e:
            errors.append(f"{record_name(source, i)}: {e}")
    if not errors:
        return
    share = len(errors) / k
    what = "every probed record" if len(errors) == k else f"{len(errors)} of {k} probed records"
    summary = f"{what} of {source!r} failed ({share:.0%} of {k} drawn at random): " + "; ".join(errors[:5])
    if share > MAX_BAD_SHARE:
        raise DataError(f"{summary}; more than {MAX_BAD_SHARE:.0%} is not a usable data set: fix or remove those "
                        "files (or give the right folder)")
    log.warning("%s; such records are skipped, counted in metrics.jsonl and named in bad_data.jsonl", summary)
