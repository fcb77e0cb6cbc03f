"""Container logs for the API: a tail of the last lines, or a follow as they grow.

The supervisor writes STORAGE/``paths.LOGS``/<container>.log and rotates it to
<container>.log.1 (each capped); these readers only ever read those files.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pvpy.device.api._limits import CONTAINER_NAME

FOLLOW_POLL = 0.25


class _LogFile:
    """One container log, read as it grows; follows the supervisor's rotation
    (name.log renamed to name.log.1, a new name.log opened)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.inode: int | None = None

    def open_at_end(self) -> None:
        with contextlib.suppress(OSError):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(self.fd)
            self.inode = st.st_ino
            os.lseek(self.fd, st.st_size, os.SEEK_SET)

    def read_new(self, limit: int = 65536) -> bytes:
        if self.fd is None:
            self.open_at_start()
            if self.fd is None:
                return b""
        data = os.read(self.fd, limit)
        if data:
            return data
        try:
            st = os.stat(self.path)
        except OSError:
            return b""
        pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        if st.st_ino != self.inode or st.st_size < pos:  # rotated or truncated
            self.close()
            self.open_at_start()
        return b""

    def open_at_start(self) -> None:
        with contextlib.suppress(OSError):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.inode = os.fstat(self.fd).st_ino

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None


class LogFiles:
    """The log of one container (raw bytes) or of all (lines prefixed "name| ")."""

    MAX_READ = 2 << 20  # a log file and its .1 are capped at 1 MiB each

    def __init__(self, logs_dir: Path, name: str | None) -> None:
        self.dir = logs_dir
        self.name = name

    def names(self) -> list[str]:
        if self.name is not None:
            return [self.name]
        try:
            entries = os.listdir(self.dir)
        except OSError:
            return []
        found = (e[: -len(".log")] for e in entries if e.endswith(".log"))
        return sorted(n for n in found if CONTAINER_NAME.fullmatch(n))

    def _tail_of(self, name: str, lines: int) -> bytes:
        if lines == 0:
            return b""
        data = b""
        for path in (self.dir / f"{name}.log.1", self.dir / f"{name}.log"):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                data += f.read(self.MAX_READ)
        kept = data.splitlines(keepends=True)[-lines:]
        return b"".join(kept)

    def tail(self, lines: int) -> bytes:
        if self.name is not None:
            return self._tail_of(self.name, lines)
        return b"".join(_prefixed(n, self._tail_of(n, lines)) for n in self.names())

    def follow(self, lines: int, gone: Callable[[], bool]) -> Iterator[bytes]:
        files: dict[str, _LogFile] = {}
        partial: dict[str, bytes] = {}

        def scan() -> None:
            for n in self.names():
                if n not in files:
                    files[n] = _LogFile(self.dir / f"{n}.log")
                    files[n].open_at_end()

        first = self.tail(lines)
        scan()  # tail then position at the end: a line written in between may show twice
        if first:
            yield first
        last_scan = time.monotonic()
        try:
            while not gone():
                sent = False
                for n, f in list(files.items()):
                    data = f.read_new()
                    if not data:
                        continue
                    if self.name is not None:
                        yield data
                    else:
                        complete, _, rest = (partial.get(n, b"") + data).rpartition(b"\n")
                        partial[n] = rest[-65536:]
                        if complete:
                            yield _prefixed(n, complete + b"\n")
                    sent = True
                if self.name is None and time.monotonic() - last_scan > 1.0:
                    scan()  # containers added by an update
                    last_scan = time.monotonic()
                if not sent:
                    time.sleep(FOLLOW_POLL)
        finally:
            for f in files.values():
                f.close()


def _prefixed(name: str, data: bytes) -> bytes:
    prefix = name.encode() + b"| "
    return b"".join(prefix + line for line in data.splitlines(keepends=True))
