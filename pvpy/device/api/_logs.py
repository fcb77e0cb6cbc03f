"""Container logs to read: a tail of the last lines, or a follow as they grow; with
their times, boots, and a time window.

The supervisor writes STORAGE/``paths.LOGS``/<container>.log and its index of times
(``pvpy.device.logsink``) and rotates both to <container>.log.1(.idx), each capped;
these readers only ever read those files. The API serves them (``GET /v1/logs``)
and ``pvpy device logs --storage`` reads them directly, even with the device off.

``LogOptions`` says how lines are shown: as written (the default, what the API
always gave), with their times (``timestamps``), as JSON lines, between ``since``
and ``until`` (unix times). Logs of several containers are merged in time order,
each line prefixed "name| "; a boot shows once as "-- boot YYYY-MM-DD HH:MM:SS UTC --".
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pvpy.device.api._limits import CONTAINER_NAME
from pvpy.device.logsink import KIND_BOOT, MARK, index_path
from pvpy.errors import UsageError

FOLLOW_POLL = 0.25
MAX_READ = 2 << 20  # a log file and its .1 are capped at 1 MiB each


@dataclass(frozen=True)
class LogOptions:
    timestamps: bool = False
    as_json: bool = False
    since: float | None = None
    until: float | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> LogOptions:
        """From the API's query: ``timestamps=1``, ``format=json``, ``since``/``until``
        as unix times. Raises UsageError (400) for a bad value."""

        def number(name: str) -> float | None:
            raw = query.get(name)
            if raw is None:
                return None
            try:
                return float(raw)
            except ValueError:
                raise UsageError(f"{name} must be a unix time in seconds") from None

        fmt = query.get("format", "text")
        if fmt not in ("text", "json"):
            raise UsageError("format must be text or json")
        return cls(timestamps=query.get("timestamps", "0").lower() in ("1", "true"),
                   as_json=fmt == "json", since=number("since"), until=number("until"))  # fmt: skip

    def wanted(self, at: float | None) -> bool:
        if self.since is None and self.until is None:
            return True
        if at is None:  # written before logs had times: outside any window
            return False
        return (self.since is None or at >= self.since) and (self.until is None or at <= self.until)


@dataclass(frozen=True)
class Entry:
    """One line of a container's log (or a boot), with its time when known."""

    name: str
    at: float | None
    data: bytes  # the line with its newline; empty for a boot
    boot: bool = False


def _read_marks(path: Path, start: int = 0) -> list[tuple[int, float, int]]:
    try:
        with open(index_path(path), "rb") as f:
            f.seek(start)
            raw = f.read()
    except OSError:
        return []
    whole = len(raw) - len(raw) % MARK.size  # a torn last record is ignored
    return [MARK.unpack_from(raw, i) for i in range(0, whole, MARK.size)]


def read_entries(path: Path, name: str) -> list[Entry]:
    """Every line of one log file, timed by its index, with its boots."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_READ)
    except OSError:
        return []
    marks = _read_marks(path)
    out: list[Entry] = []
    m, at = 0, None
    offset = 0
    for line in data.splitlines(keepends=True):
        while m < len(marks) and marks[m][0] <= offset:
            _, mark_time, kind = marks[m]
            if kind == KIND_BOOT:
                out.append(Entry(name, mark_time, b"", boot=True))
            else:
                at = mark_time
            m += 1
        out.append(Entry(name, at, line))
        offset += len(line)
    out += [Entry(name, t, b"", boot=True) for o, t, k in marks[m:] if k == KIND_BOOT]
    return out


def render(entries: list[Entry], options: LogOptions, prefixed: bool) -> bytes:
    """Lines as the reader asked for them; each boot once."""
    parts: list[bytes] = []
    boots_seen: set[float | None] = set()
    for e in entries:
        if e.boot:
            if e.at in boots_seen:
                continue
            boots_seen.add(e.at)
        if options.as_json:
            doc = {"container": e.name, "time": e.at, "boot": e.boot,
                   "line": e.data.decode(errors="replace").rstrip("\n")}  # fmt: skip
            parts.append(json.dumps(doc).encode() + b"\n")
            continue
        if e.boot:
            parts.append(f"-- boot {_utc(e.at, seconds=True)} UTC --\n".encode())
            continue
        line = e.data if e.data.endswith(b"\n") else e.data + b"\n"
        if options.timestamps:
            line = (_utc(e.at) + " ").encode() + line
        parts.append(e.name.encode() + b"| " + line if prefixed else line)
    return b"".join(parts)


def _utc(at: float | None, seconds: bool = False) -> str:
    if at is None:
        return "-" * (19 if seconds else 24)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at))
    if seconds:
        return stamp.replace("T", " ")
    return f"{stamp}.{int(at % 1 * 1000):03d}Z"


class _LogFile:
    """One container log, read as it grows; follows the supervisor's rotation
    (name.log renamed to name.log.1, a new name.log opened)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.inode: int | None = None
        self.index_read = 0  # bytes of the index already seen (its boots)

    def open_at_end(self) -> None:
        with contextlib.suppress(OSError):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(self.fd)
            self.inode = st.st_ino
            os.lseek(self.fd, st.st_size, os.SEEK_SET)
            with contextlib.suppress(OSError):
                size = os.stat(index_path(self.path)).st_size
                self.index_read = size - size % MARK.size

    def new_boots(self) -> list[float]:
        marks = _read_marks(self.path, self.index_read)
        self.index_read += len(marks) * MARK.size
        return [t for _, t, kind in marks if kind == KIND_BOOT]

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
            self.index_read = 0

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None


class LogFiles:
    """The logs of one container, of several, or of all (``name`` None)."""

    MAX_READ = MAX_READ

    def __init__(
        self, logs_dir: Path, name: str | None, options: LogOptions | None = None,
        names: list[str] | None = None,
    ) -> None:  # fmt: skip
        self.dir = logs_dir
        self.name = name
        self.wanted = names if names else ([name] if name is not None else None)
        self.options = options or LogOptions()

    @property
    def prefixed(self) -> bool:
        return self.wanted is None or len(self.wanted) > 1

    def names(self) -> list[str]:
        if self.wanted is not None:
            return list(self.wanted)
        try:
            entries = os.listdir(self.dir)
        except OSError:
            return []
        found = (e[: -len(".log")] for e in entries if e.endswith(".log"))
        return sorted(n for n in found if CONTAINER_NAME.fullmatch(n))

    def _entries_of(self, name: str, lines: int) -> list[Entry]:
        if lines == 0:
            return []
        entries: list[Entry] = []
        for path in (self.dir / f"{name}.log.1", self.dir / f"{name}.log"):
            entries += read_entries(path, name)
        entries = [e for e in entries if self.options.wanted(e.at)]
        kept, count = len(entries), 0
        while kept > 0 and count < lines:  # the last `lines` lines, with their boots
            kept -= 1
            count += not entries[kept].boot
        while kept > 0 and entries[kept - 1].boot:
            kept -= 1
        return entries[kept:]

    def tail(self, lines: int) -> bytes:
        entries = [e for n in self.names() for e in self._entries_of(n, lines)]
        if self.prefixed:  # merged by time; lines of no known time first, in file order
            entries.sort(key=lambda e: e.at if e.at is not None else 0.0)
        return render(entries, self.options, self.prefixed)

    def follow(self, lines: int, gone: Callable[[], bool]) -> Iterator[bytes]:
        files: dict[str, _LogFile] = {}
        partial: dict[str, bytes] = {}
        boots_shown: set[float] = set()
        until = self.options.until

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
            while not gone() and (until is None or time.time() <= until):
                sent = False
                for n, f in list(files.items()):
                    new: list[Entry] = []
                    for boot in f.new_boots():
                        if boot not in boots_shown:
                            boots_shown.add(boot)
                            new.append(Entry(n, boot, b"", boot=True))
                    data = f.read_new()
                    if data:
                        # a followed line is timed when it is read (within FOLLOW_POLL)
                        complete, _, rest = (partial.get(n, b"") + data).rpartition(b"\n")
                        partial[n] = rest[-65536:]
                        if complete:
                            now = time.time()
                            new += [Entry(n, now, line + b"\n") for line in complete.split(b"\n")]
                    if new:
                        yield render(new, self.options, self.prefixed)
                        sent = True
                if self.wanted is None and time.monotonic() - last_scan > 1.0:
                    scan()  # containers added by an update
                    last_scan = time.monotonic()
                if not sent:
                    time.sleep(FOLLOW_POLL)
        finally:
            for f in files.values():
                f.close()
