"""How a STARTED container proves READY (``readiness`` of its manifest).

- ``file``: the path exists in its rootfs;
- ``tcp`` with the host's network: 127.0.0.1:port accepts, tried from here;
- ``tcp`` in its own network namespace, and ``command``: a check process run
  inside the container (``crun exec``); READY when it exits 0. It is PID 1's
  child like the containers: its exit comes back through ``on_exit``;
- ``notify``: the container writes ``READY=1`` to its notify FIFO
  (``/run/pvpy/notify`` inside it, opened by ``open_notify``); nothing to poll.

Checks run every ``interval_ms`` until one passes.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from pvpy import _run
from pvpy.device.managed import Managed

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from pvpy.device.runtime import ContainerRuntime


def open_notify(path: Path) -> tuple[int, int]:
    """Open (making it) the notify FIFO at ``path``: (read end, our own write end).
    Holding a write end ourselves keeps the read end from seeing EOF each time a
    writer in the container closes it.

    The directory is the container's ``/run/pvpy``, writable from inside: whatever
    is at ``path`` may have been put there by a hostile app (a symlink to a host
    file, a device node, a regular file). Nothing there is followed or opened for
    I/O unless it is a FIFO: the inode is pinned with O_PATH|O_NOFOLLOW, checked,
    and reopened through /proc/self/fd, so it cannot be swapped in between. Anything
    else is replaced with a fresh FIFO. Raises OSError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        try:
            pinned = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            os.mkfifo(path, 0o620)
            continue
        try:
            if not stat.S_ISFIFO(os.fstat(pinned).st_mode):
                os.unlink(path)  # a link or a file the container left: not ours to open
                continue
            via = f"/proc/self/fd/{pinned}"
            read_fd = os.open(via, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                keep_fd = os.open(via, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                os.close(read_fd)
                raise
            return read_fd, keep_fd
        finally:
            os.close(pinned)
    raise OSError(f"{path}: replaced again and again while being opened")


def read_notify(fd: int) -> list[str]:
    """The messages waiting in a notify FIFO, one per line."""
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return []
    return data.decode(errors="replace").splitlines()


def _tcp_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return True
        # loopback answers at once: connected, refused, or in progress
        import select

        _, writable, _ = select.select([], [s], [], 0.05)
        return bool(writable) and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


class ReadinessChecks:
    """The readiness checks of one supervisor's containers, and their check processes."""

    def __init__(self, runtime: ContainerRuntime) -> None:
        self.runtime = runtime
        self._by_pid: dict[int, Managed] = {}

    def poll(self, m: Managed, now: float) -> bool:
        """Check ``m`` if a check is due and none is in flight. True: it proved
        READY just now. A command check only starts here; its result comes through
        ``on_exit``. Raises CommandError when the check process cannot start."""
        r = m.spec.readiness
        assert r is not None
        if m.check_pid is not None or now < m.next_check:
            return False
        m.next_check = now + r.interval_ms / 1000
        if r.type == "file":
            pid = self.runtime.init_pid(m.spec)
            # through the container's own mounts (/run, /tmp and volumes are its
            # own tmpfs/binds the bundle's rootfs does not show); never followed
            return pid is not None and os.path.lexists(f"/proc/{pid}/root/{r.path.lstrip('/')}")
        if r.type == "tcp" and m.spec.network == "host":
            return _tcp_accepts(r.port)
        if r.type in ("command", "tcp"):
            argv = list(r.command) if r.type == "command" else [
                "sh", "-c", f"nc -z 127.0.0.1 {r.port} || (echo > /dev/tcp/127.0.0.1/{r.port})"
            ]  # fmt: skip
            # its output ("initializing", "offline") is no news: not on PID 1's console
            quiet = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                pid = _run.spawn(self.runtime.exec_argv(m.spec, argv), stdout=quiet, stderr=quiet)
            finally:
                os.close(quiet)
            m.check_pid = pid
            m.check_deadline = now + r.timeout_ms / 1000
            self._by_pid[pid] = m
        return False  # notify: nothing to poll, the supervisor's on_notify() does it

    def on_exit(self, pid: int) -> Managed | None:
        """The container whose check process ``pid`` was, or None if it was none."""
        m = self._by_pid.pop(pid, None)
        if m is not None:
            m.check_pid = None
        return m
