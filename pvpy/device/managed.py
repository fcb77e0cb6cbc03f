"""One container as the supervisor sees it at run time (``Managed``) and its statuses.

A ``Managed`` holds what changes while the container runs: its status, the
crun process, the fds PID 1 waits on for it (output pipe, console, notify FIFO),
its log, and its restart counts. It knows the arithmetic of its restart policy;
the supervisor decides when to use it.

A ``Console`` is a container's own /dev/console (systemd.io/CONTAINER_INTERFACE):
a pty that PID 1 opens, whose slave the bundle bind-mounts at /dev/console and
whose master PID 1 reads into the container's log, as it reads the output pipe.
What a container writes there never reaches the device's console, and PID 1
never blocks on it (the master is non-blocking; a full log disk loses lines,
``LogSink``). Why not crun's own (``terminal: true``, ``--console-socket``):
that makes the pty the process's stdin, stdout and stderr too (a controlling
terminal for every app, its output through the line discipline), and costs
PID 1 a listening socket and an fd handed over per start.
"""

from __future__ import annotations

import contextlib
import os
import signal

from pvpy.device import _linux
from pvpy.device.logsink import LogSink
from pvpy.log import get_logger
from pvpy.state.model import Container

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

INSTALLED, MOUNTED, STARTING, STARTED, READY = (
    "INSTALLED", "MOUNTED", "STARTING", "STARTED", "READY",
)  # fmt: skip
RECOVERING, STOPPING, STOPPED, FAILED = "RECOVERING", "STOPPING", "STOPPED", "FAILED"
RUNNING = (STARTING, STARTED, READY)

# The supervisor's logger: these lines read as they did before this module was split out.
log = get_logger("supervisor")


def describe_status(status: int) -> str:
    """A wait status in words: ``exit 3``, ``killed by SIGKILL``."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


class Console:
    """A pty that is one container's /dev/console, kept for as long as its record.

    PID 1 keeps a slave fd of its own open: when the container closes its last
    one (it exits, restarts, or closes and reopens /dev/console) the master
    would otherwise read EIO, readable again at once: a busy loop. Output is not
    post-processed (OPOST off), so the log holds the bytes written, not "\r\n"
    for every "\n". An init may turn it on again (systemd resets its console;
    a hangup resets a pty's modes): a read with "\r\n" in it turns it off
    again, and that read's "\r\n" become "\n".

    Raises OSError when no pty can be had (no devpts, the pty limit reached).
    """

    def __init__(self, uid: int, gid: int) -> None:
        self.master, self.keep = os.openpty()  # both close-on-exec: crun gets neither
        try:
            self.path = os.ttyname(self.keep)  # /dev/pts/N, which the bundle binds
            os.fchown(self.keep, uid, gid)  # the container's user opens it
            os.set_blocking(self.master, False)
            _linux.tty_output_raw(self.master)
        except OSError:
            self.close()
            raise

    def read_into(self, sink: LogSink | None) -> None:
        """Copy one read of the master to ``sink``. Raises OSError when the master
        cannot be read (not EAGAIN): its owner closes it."""
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        if b"\r\n" in data:
            _linux.tty_output_raw(self.master)
            data = data.replace(b"\r\n", b"\n")
        if data and sink is not None:
            sink.write(data)

    def close(self) -> None:
        """Close both ends: a container still writing to it gets EIO, never blocks."""
        for fd in (self.master, self.keep):
            with contextlib.suppress(OSError):
                os.close(fd)


class Managed:
    """What the supervisor knows about one container at run time."""

    def __init__(self, spec: Container, order: int) -> None:
        self.spec = spec
        self.order = order
        self.status = INSTALLED
        self.reason = ""
        self.pid: int | None = None  # the crun process, our child
        self.out_fd: int | None = None  # read end of its stdout+stderr pipe
        self.restarts = 0  # consecutive, reset by the stable window
        self.total_restarts = 0
        self.started_at = 0.0
        self.next_start: float | None = None
        self.stop_deadline: float | None = None
        self.killed = False
        self.signal_unsent: str | None = None  # a stop signal crun could not take yet
        self.check_pid: int | None = None  # readiness command in flight
        self.next_check = 0.0
        self.check_deadline = 0.0
        self.exit_code: int | None = None
        self.last_exit: str = ""
        self.log: LogSink | None = None
        self.restart_requested = False
        self.out_token = 0
        self.console: Console | None = None  # its /dev/console, kept across restarts
        self.console_token = 0
        self.notify_fd: int | None = None  # read end of the notify FIFO
        self.notify_keep: int | None = None  # our write end: no EOF when writers leave
        self.notify_token = 0
        # The revision whose disks (``revision`` writable layer and volumes) the
        # running process uses: the one it was started in. An app-only update
        # carries an unchanged container over with its process, so this can be
        # older than the revision running; GC must keep that trail (``revisions_in_use``).
        self.disk_revision: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def uses_revision_disks(self) -> bool:
        """Its process runs on a writable layer or volume under a revision's trail."""
        spec = self.spec
        return self.pid is not None and (
            spec.writable == "revision" or any(v.persistence == "revision" for v in spec.volumes)
        )

    def goal_met(self) -> bool:
        if self.spec.status_goal == READY:
            return self.status == READY
        return self.status in (STARTED, READY)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.spec.group,
            "role": self.spec.role,
            "status": self.status,
            "goal": self.spec.status_goal,
            "goal_met": self.goal_met(),
            "restarts": self.total_restarts,
            "pid": self.pid,
            "reason": self.reason,
            "last_exit": self.last_exit,
        }

    def record_exit(self, status: int) -> None:
        """Its crun process ended with wait status ``status``: keep the last of its
        output, close the pipe, remember how it ended."""
        if self.out_fd is not None:
            self.read_output()  # drain what is left
            if self.out_fd is not None:
                os.close(self.out_fd)
                self.out_fd = None
        self.read_console()  # its last words, before what its next run writes
        self.pid = None
        self.disk_revision = None  # its next start is in the revision then running
        self.last_exit = describe_status(status)
        self.exit_code = os.waitstatus_to_exitcode(status)

    # -- restart policy ----------------------------------------------------------

    def ran_stable(self, now: float) -> bool:
        """Up for the policy's stable window since its last start: earlier crashes
        no longer count towards a crash loop."""
        return now - self.started_at >= self.spec.restart.stable_window_ms / 1000

    def schedule_restart(self, now: float) -> float | None:
        """Count a restart after an exit at ``now`` and set ``next_start``; return
        its delay in seconds, or None for a crash loop (``max_retries`` restarts in
        a row already: nothing counted). The delay doubles with each restart in a
        row, from ``backoff_initial_ms`` up to ``backoff_max_ms``."""
        policy = self.spec.restart
        if self.ran_stable(now):
            self.restarts = 0
        if self.restarts >= policy.max_retries:
            return None
        delay: float = (
            min(policy.backoff_initial_ms * (2**self.restarts), policy.backoff_max_ms) / 1000
        )
        self.restarts += 1
        self.total_restarts += 1
        self.next_start = now + delay
        return delay

    # -- fds -----------------------------------------------------------------------

    def read_output(self) -> None:
        """Copy one read of the output pipe to the log; at EOF close the pipe."""
        if self.out_fd is None:
            return
        try:
            data = os.read(self.out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if self.log is not None:
                self.log.write(data)
            return
        os.close(self.out_fd)  # EOF: crun and the container closed their ends
        self.out_fd = None

    def read_console(self) -> None:
        """Copy one read of the console to the log; a console that cannot be read
        is closed (the container writes on into EIO)."""
        if self.console is None:
            return
        try:
            self.console.read_into(self.log)
        except OSError as e:
            log.error("console closed", container=self.name, error=str(e))
            self.close_console()

    def close_console(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None

    def drop_fd(self, fd: int) -> None:
        """Close ``fd`` (its output pipe, console or notify FIFO) because PID 1 cannot
        wait on it."""
        if self.console is not None and fd == self.console.master:
            self.close_console()
        for attr in ("out_fd", "notify_fd"):
            if getattr(self, attr) == fd:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)
        if self.notify_fd is None and self.notify_keep is not None:
            # its next start opens the FIFO again (``Launcher.spawn``)
            with contextlib.suppress(OSError):
                os.close(self.notify_keep)
            self.notify_keep = None

    def close_fds(self) -> None:
        """Close the notify FIFO, the output pipe, the console and the log (idempotent)."""
        self.close_console()
        for attr in ("notify_fd", "notify_keep", "out_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)
        if self.log is not None:
            self.log.close()
            self.log = None


def carry_over(
    old: dict[str, Managed], order: list[Container], replaced: set[str]
) -> dict[str, Managed]:
    """The records of a new revision's containers (``order``: its start order).
    A container not in ``replaced`` whose spec did not change keeps its record,
    so its process runs on untouched; the records left behind get their fds closed."""
    containers: dict[str, Managed] = {}
    for i, spec in enumerate(order):
        kept = old.get(spec.name)
        if kept is not None and spec.name not in replaced and kept.spec == spec:
            kept.order = i
            containers[spec.name] = kept
        else:
            containers[spec.name] = Managed(spec, i)
    for name, m in old.items():
        if containers.get(name) is not m:
            m.close_fds()
    return containers
