"""Container output to a size-capped log file, ``STORAGE/logs/<name>.log``.

One rotation: at the cap, ``name.log`` becomes ``name.log.1`` (replacing the
previous one) and a new ``name.log`` is opened, so a container never holds
more than two files. The device API's log reader follows this rotation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pvpy.log import get_logger

# The supervisor's logger: these lines read as they did before the sink had its own module.
log = get_logger("supervisor")

LOG_CAP = 1 << 20  # bytes per container log file before it rotates to .1


class LogSink:
    """Container output to a size-capped file (one rotation: name.log.1)."""

    def __init__(self, path: Path, cap: int = LOG_CAP) -> None:
        self.path = path
        self.cap = cap
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.cap:
            os.close(self._fd)
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._size = 0
        try:
            self._size += os.write(self._fd, data)
        except OSError as e:  # a full disk must not stop the container or PID 1
            log.warning("log write failed", path=str(self.path), error=str(e))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
