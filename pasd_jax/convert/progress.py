"""Stage lines for long weight work: before each stage, what it does, how much and about how long; after, how long.

Converting an official SD1.5-size PASD checkpoint moves about 6 GB (read and re-layout, write the cache entry);
without a word that is a minute or more of silence. Lines go to the `pasd_jax` logger at INFO (the CLIs show it);
work under `QUIET_BYTES` (the tiny test models) says nothing. The rates are a 2-vCPU EPYC VM's (bench/RESULTS.md
"CPU step and memory"): a faster machine finishes early, which the closing line shows.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

log = logging.getLogger("pasd_jax.convert")

QUIET_BYTES = 64 << 20
# bytes per second, measured: map + transpose into the Flax layout 735 MB/s (page cache warm; a cold disk is
# slower), streamed safetensors write 325 MB/s, SHA-256 of the entry 1.4 GB/s plus paging it in
RATES = {"convert": 400e6, "write": 300e6, "verify": 800e6}


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


@contextlib.contextmanager
def stage(what: str, action: str, nbytes: int, rate: str, index: int | None = None,
          total: int | None = None) -> Iterator[None]:
    """Log "<what>: [i/n] <action> (<size>, about <t>)" before and "... done in <t>" after the block."""
    if nbytes < QUIET_BYTES:
        yield
        return
    step = f"[{index}/{total}] " if index is not None and total else ""
    log.info("%s: %s%s (%s, about %s)", what, step, action, _size(nbytes), _secs(nbytes / RATES[rate]))
    t0 = time.perf_counter()
    yield
    log.info("%s: %s%s done in %s", what, step, action, _secs(time.perf_counter() - t0))
