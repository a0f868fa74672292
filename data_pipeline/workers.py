"""Loader worker processes never outlive the trainer that started them.

Grain's workers are daemonic, so a trainer that exits normally takes them along; one that is SIGKILLed (by a
scheduler, or the OOM killer) cannot, and the workers block forever on a queue nobody reads, each holding its
memory. A watch thread in every worker exits it as soon as its parent is gone (the kernel then re-parents it, so
`getppid()` changes). `prctl(PR_SET_PDEATHSIG)` would not do: it fires when the *thread* that started the worker
ends, and Grain starts workers from a thread pool.
"""
from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5


def exit_with_parent(poll_s: float = POLL_S) -> threading.Thread:
    """Start the watch thread in this (worker) process; returns it (a daemon, it costs one wake-up per poll)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(0)  # nothing to flush: the batches it made have nowhere to go

    thread = threading.Thread(target=watch, name="pasd-exit-with-parent", daemon=True)
    thread.start()
    return thread
