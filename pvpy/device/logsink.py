"""Container output to a size-capped log file, ``STORAGE/logs/<name>.log``, with times.

The log file holds the container's bytes as it wrote them (``tail -f`` shows its
own output). Beside it, ``<name>.log.idx`` says when they came: one record per
write (``offset, unix time, kind``; at most one per ``MARK_EVERY`` seconds, so a
line's time is exact to 10 ms) and a boot record when this boot first opens the
log, which ``pvpy device logs`` turns into a "-- boot --" line. A record goes in
after the bytes it times: a power cut between the two leaves lines timed by the
record before (the reader ignores a torn last record).

One rotation: at the cap, ``name.log`` becomes ``name.log.1`` (replacing the
previous one), its index ``name.log.1.idx``, and new files are opened, so a
container never holds more than two of each. The device API's log reader
(``pvpy.device.api._logs``) follows this rotation.

Anything that produces a container's output (its stdout/stderr pipe, a console)
hands it to ``LogSink.write(data)``: bytes in, nothing else to know.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from pathlib import Path

from pvpy.log import get_logger

# The supervisor's logger: these lines read as they did before the sink had its own module.
log = get_logger("supervisor")

LOG_CAP = 1 << 20  # bytes per container log file before it rotates to .1
INDEX_SUFFIX = ".idx"
MARK = struct.Struct("<QdB")  # offset in the log, unix time, kind
KIND_OUTPUT, KIND_BOOT = 0, 1
MARK_EVERY = 0.01  # seconds: writes closer together share the time of the first
# This process's boot: PID 1 imports this module once per boot; every container's
# boot record carries this time, so readers can tell one boot from the next.
BOOT_TIME = time.time()
_opened_this_boot: set[str] = set()


def index_path(log_path: Path) -> Path:
    """Where the times of ``log_path``'s bytes are kept."""
    return log_path.with_name(log_path.name + INDEX_SUFFIX)


class LogSink:
    """Container output to a size-capped file (one rotation: name.log.1), timed."""

    def __init__(self, path: Path, cap: int = LOG_CAP) -> None:
        self.path = path
        self.cap = cap
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._index_fd = -1
        self._size = 0
        self._last_mark = 0.0
        self._open()
        if str(path) not in _opened_this_boot:
            _opened_this_boot.add(str(path))
            self._mark(KIND_BOOT, BOOT_TIME)

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o640)
        self._size = os.fstat(self._fd).st_size
        try:
            self._index_fd = os.open(index_path(self.path), flags, 0o640)
        except OSError as e:  # times are a nicety: the output itself must still go in
            self._index_fd = -1
            log.warning("log index unavailable", path=str(self.path), error=str(e))
        self._last_mark = 0.0

    def _mark(self, kind: int, at: float) -> None:
        if self._index_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._index_fd, MARK.pack(self._size, at, kind))

    def _rotate(self) -> None:
        self.close()
        rotated = self.path.with_name(self.path.name + ".1")
        os.replace(self.path, rotated)
        with contextlib.suppress(OSError):
            os.replace(index_path(self.path), index_path(rotated))
        self._open()

    def write(self, data: bytes) -> None:
        """Append ``data`` (any bytes, any chunking) and note when it came."""
        if self._size + len(data) > self.cap:
            self._rotate()
        now = time.time()
        offset = self._size
        try:
            self._size += os.write(self._fd, data)
        except OSError as e:  # a full disk must not stop the container or PID 1
            log.warning("log write failed", path=str(self.path), error=str(e))
            return
        if now - self._last_mark >= MARK_EVERY:
            self._last_mark = now
            if self._index_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._index_fd, MARK.pack(offset, now, KIND_OUTPUT))

    def close(self) -> None:
        for fd in (self._fd, self._index_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._index_fd = -1
