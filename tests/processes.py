"""Process helpers for the tests that kill trainers and check that no worker is left behind."""
from __future__ import annotations

import time


def children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def alive(pids: list[int]) -> list[int]:
    """The pids still running (zombies count as gone: their process has exited)."""
    import psutil

    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait up to `timeout` s for `pids` to exit; the ones still alive then."""
    t0 = time.time()
    while alive(pids) and time.time() - t0 < timeout:
        time.sleep(0.1)
    return alive(pids)
