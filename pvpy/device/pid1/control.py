"""PID 1's control socket (RUN_DIR/control.sock, root only): one JSON line in, one out.

The server never blocks the loop: clients are non-blocking, each has a buffer
and CLIENT_TIMEOUT to send its whole line, and a request bigger than
MAX_REQUEST is dropped. ``dispatch`` answers a request; an exception there
becomes an error reply (a bad request must never hurt PID 1). A status reply
stays small whatever the storage holds (``STATUS_UPDATES`` records and a count). Clients:
``pvpy.control`` (the CLI, the API server, the puller, the tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pvpy import paths
from pvpy.bootvars import BootVars
from pvpy.device.pid1.loop import Loop
from pvpy.device.pid1.shutdown import REBOOT_COMMANDS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

    from pvpy.device.pid1.process import Pid1
    from pvpy.device.update import Progress

MAX_REQUEST = 64 * 1024
STATUS_UPDATES = 32  # update records in a status reply: the newest (see ``recent_progress``)
CLIENT_TIMEOUT = 2.0

Handler = Callable[["dict[str, Any]"], "dict[str, Any]"]


class ControlServer:
    """Accepts clients, buffers their request line, answers it with ``handle``."""

    def __init__(self, loop: Loop, handle: Handler) -> None:
        self.loop = loop
        self.handle = handle
        self.sock: socket.socket | None = None
        self.clients: dict[socket.socket, tuple[bytearray, float]] = {}  # -> (buffer, since)

    def open(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)  # root only
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock
        self.loop.watch(sock, self._accept)

    def next_deadline(self) -> float | None:
        """When the slowest client in progress runs out of time."""
        oldest = min((since for _, since in self.clients.values()), default=None)
        return None if oldest is None else oldest + CLIENT_TIMEOUT

    def expire(self, now: float) -> None:
        """Drop the clients that did not send their line in time."""
        for conn, (_, since) in list(self.clients.items()):
            if now - since > CLIENT_TIMEOUT:
                self._drop(conn)

    def _accept(self, _fd: int) -> None:
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.clients[conn] = (bytearray(), time.monotonic())
        self.loop.watch(conn, lambda _fd: self._read(conn))

    def _drop(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        self.loop.unwatch(conn)
        conn.close()

    def _read(self, conn: socket.socket) -> None:
        buf, _ = self.clients[conn]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf.extend(data)
        if b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                self._drop(conn)
            return
        line = bytes(buf).split(b"\n", 1)[0]
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be an object")
            reply = self.handle(request)
        except Exception as e:  # a bad request must never hurt PID 1
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(json.dumps(reply).encode() + b"\n")
        self._drop(conn)


def dispatch(pid1: Pid1, request: dict[str, Any]) -> dict[str, Any]:
    """Answer one control request."""
    cmd = request.get("cmd")
    supervisor = pid1.supervisor
    if cmd == "status":
        return status(pid1)
    if cmd in REBOOT_COMMANDS:
        pid1.request(str(cmd), "control socket")
        return {"ok": True}
    if cmd in ("restart", "stop") and supervisor is not None:
        name = request.get("container")
        if not supervisor.has(name):
            return {"ok": False, "error": f"no container {name!r}"}
        assert isinstance(name, str)  # has() says so
        if cmd == "restart":
            supervisor.restart(name)
        else:
            supervisor.stop(name)
        return {"ok": True}
    if cmd == "update":
        revision = request.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool):
            return {"ok": False, "error": "revision must be an integer"}
        return pid1.updates.begin(revision)
    if cmd == "rollback":
        return pid1.updates.rollback()
    if cmd == "gc":
        return pid1.updates.gc_now()
    if cmd == "inject" and os.environ.get("PVPY_TEST_FAULTS") == "1":
        pid1.fault = str(request.get("fault"))
        return {"ok": True}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def recent_progress(storage: Path, limit: int) -> tuple[list[Progress], int]:
    """The update records of the ``limit`` newest revisions (oldest first) and how
    many records there are. Only their names are listed, only those ``limit`` are
    read: a storage can hold any number (every update offered leaves one), and
    reading them all for every status request made PID 1 slow and its reply huge."""
    from pvpy.device import update as up

    try:
        names = os.listdir(Path(storage) / paths.PROGRESS)
    except OSError:
        return [], 0
    revisions = sorted(
        int(stem) for stem in (n[:-5] for n in names if n.endswith(".json"))
        if stem.isascii() and stem.isdigit()
    )  # fmt: skip
    shown = [up.read_progress(storage, r) for r in revisions[-limit:]] if limit > 0 else []
    return [p for p in shown if p is not None], len(revisions)


def status(pid1: Pid1) -> dict[str, Any]:
    supervisor, boot = pid1.supervisor, pid1.boot
    sup = supervisor.status() if supervisor else {
        "containers": [], "all_goals_met": False, "goals_missed": [], "group": None,
    }  # fmt: skip
    env = BootVars()
    with contextlib.suppress(Exception):
        if boot.bootenv is not None:
            env = BootVars.parse(boot.bootenv.read())
    updates = pid1.updates
    updates_shown, updates_total = recent_progress(pid1.storage, STATUS_UPDATES)
    return {
        "ok": True,
        "pid": os.getpid(),
        **sup,
        "revision": boot.revision,
        "committed": env.rev,
        "try": env.try_rev,
        "updating": updates.update.revision if updates.update else None,
        "updates": [p.to_dict() for p in updates_shown],
        "updates_total": updates_total,
        "trying": updates.trying,
        "testing": updates.countdown(),
        "boot_error": boot.boot_error,
        "pending": pid1.shutdown.action,
        "uptime": round(time.monotonic() - pid1.booted_at, 3),
    }
