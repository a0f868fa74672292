"""SIGTERM / SIGINT for a folder run: stop cleanly, say what was done, exit 128 + the signal number.

Before sampling starts (loading weights) a signal interrupts at once (`Interrupted`); while sampling it only sets
a flag that the runner reads between batches, so the batch on the device finishes and its images are written
(every write is atomic, so even a hard kill leaves no partial file). A second SIGINT interrupts at once.
"""
from __future__ import annotations

import signal
import threading
from typing import Self

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Context manager; `stopping()` is the flag, `deferred()` switches from interrupting to flagging."""

    def __init__(self):
        self.received: int | None = None
        self._defer = False
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or 0)

    def stopping(self) -> bool:
        return self.received is not None

    def deferred(self) -> Self:
        self._defer = True
        return self

    def _handler(self, signum, frame):
        again = self.received is not None
        self.received = signum
        if not self._defer or (again and signum == signal.SIGINT):
            raise Interrupted(signum)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
