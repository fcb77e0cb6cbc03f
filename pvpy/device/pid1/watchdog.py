"""The hardware watchdog (/dev/watchdog, or a file in tests), fed by PID 1's loop.

Fed only after a loop iteration that went well (see ``loop.run_forever``): a
wedged PID 1 stops feeding it and the board resets.
"""

from __future__ import annotations

import contextlib
import os

from pvpy.log import get_logger

log = get_logger("init")


class Watchdog:
    """/dev/watchdog (or a test path): fed from the loop while it is healthy."""

    def __init__(self, path: str | None, interval: float) -> None:
        self.fd: int | None = None
        self.interval = interval
        self.last = 0.0
        if path and os.path.exists(path):
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                log.info("watchdog opened", path=path, interval=interval)
            except OSError as e:
                log.warning("watchdog unavailable", path=path, error=str(e))

    def next_feed(self) -> float | None:
        """When the loop must be awake to feed it (None: no watchdog open)."""
        return None if self.fd is None else self.last + self.interval

    def feed(self, now: float) -> None:
        if self.fd is not None and now - self.last >= self.interval:
            with contextlib.suppress(OSError):
                os.write(self.fd, b"1")
            self.last = now

    def disarm(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, b"V")  # magic close: an orderly stop is no hang
                os.close(self.fd)
            self.fd = None
