"""Starting a container's crun process, and the fds PID 1 waits on for it.

``Launcher.open_console`` gives a container its /dev/console (a pty, see
``managed.Console``) before its bundle is written. ``Launcher.spawn`` runs
``crun run`` in the foreground as our child, its stdout and stderr into a pipe
whose read end PID 1 watches (the output goes to the container's ``LogSink``,
as does the console's), after opening the container's notify FIFO.
An inotify watch on the bundle dir wakes PID 1 when crun writes the pid file,
which is when the supervisor calls the container STARTED.

Each fd comes with a token unique to its opening: PID 1 re-registers an fd
whose number came back for a new pipe, rather than trusting the number.
"""

from __future__ import annotations

import contextlib
import os

from pvpy import _run
from pvpy.device import _linux
from pvpy.device.logsink import LogSink
from pvpy.device.managed import Console, Managed
from pvpy.device.readiness import open_notify
from pvpy.errors import PvpyError
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from pvpy.device.runtime import ContainerRuntime

# The supervisor's logger: these lines read as they did before this module was split out.
log = get_logger("supervisor")


class Launcher:
    """Spawns the containers' crun processes and knows which child is which."""

    def __init__(self, runtime: ContainerRuntime, clock: Callable[[], float]) -> None:
        self.runtime = runtime
        self.clock = clock
        self._by_pid: dict[int, Managed] = {}
        self._tokens = 0
        # crun writes the pid file once the container runs: watching the bundle
        # dirs says STARTED at once, where polling for it cost up to 50 ms
        self.inotify_fd: int | None = None
        try:
            self.inotify_fd = _linux.inotify_init()
        except OSError as e:
            log.warning("no inotify: polling for started containers", error=str(e))

    def open_console(self, m: Managed) -> str | None:
        """The path of ``m``'s console pty (opened on its first start, kept across
        restarts) for its bundle to bind at /dev/console; None when no pty can be
        had: the container runs without one rather than not at all."""
        if m.console is None:
            try:
                m.console = Console(m.spec.uid, m.spec.gid)
            except OSError as e:
                log.warning("no console", container=m.name, error=str(e))
                return None
            m.console_token = self._next_token()
        return m.console.path

    def spawn(self, m: Managed) -> None:
        """Start the crun process of ``m`` (prepared by the runtime) and note its
        pid, output pipe and start time in ``m``. Raises CommandError when crun
        cannot be started."""
        paths = self.runtime.paths
        if m.notify_fd is None:
            m.notify_fd, m.notify_keep = open_notify(paths.control_dir(m.name) / "notify")
            m.notify_token = self._next_token()
        if m.log is None:
            m.log = LogSink(paths.log_file(m.name))
        bundle = paths.bundle(m.name)
        # a pid file of the last run would read as STARTED before this one runs
        (bundle / "pid").unlink(missing_ok=True)
        if self.inotify_fd is not None:  # watch before crun can write the new one
            with contextlib.suppress(OSError):
                _linux.inotify_watch(self.inotify_fd, str(bundle),
                                     _linux.IN_CLOSE_WRITE | _linux.IN_MOVED_TO)  # fmt: skip
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        try:
            pid = _run.spawn(self.runtime.run_argv(m.spec), stdout=write_fd, stderr=write_fd)
        except PvpyError:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        m.pid, m.out_fd = pid, read_fd
        m.out_token = self._next_token()
        m.started_at = self.clock()
        m.next_start = None
        m.exit_code = None
        self._by_pid[pid] = m

    def exited(self, pid: int) -> Managed | None:
        """The container whose crun process ``pid`` was, or None if it was none."""
        return self._by_pid.pop(pid, None)

    def watched_fds(self, containers: Iterable[Managed]) -> dict[int, int]:
        """Every fd PID 1 should wait on, with a token unique to its opening."""
        fds: dict[int, int] = {} if self.inotify_fd is None else {self.inotify_fd: 0}
        for m in containers:
            if m.out_fd is not None:
                fds[m.out_fd] = m.out_token
            if m.console is not None:
                fds[m.console.master] = m.console_token
            if m.notify_fd is not None:
                fds[m.notify_fd] = m.notify_token
        return fds

    def on_inotify(self, fd: int) -> bool:
        """Drain the inotify events if ``fd`` is ours (True); the tick after this
        wake-up reads the pid files."""
        if fd != self.inotify_fd:
            return False
        with contextlib.suppress(OSError):
            while os.read(fd, 65536):
                pass
        return True

    def poll_interval(self) -> float:
        """How often to look for a STARTING container's pid file: inotify wakes
        us when crun writes it, so poll often only without inotify."""
        return 0.05 if self.inotify_fd is None else 1.0

    def close(self) -> None:
        if self.inotify_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.inotify_fd)
            self.inotify_fd = None

    def _next_token(self) -> int:
        self._tokens += 1
        return self._tokens
