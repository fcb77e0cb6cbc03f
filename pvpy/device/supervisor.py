"""The supervisor: runs one revision's containers and keeps them at their goals.

It is event driven and never blocks for long: PID 1's loop hands it child
exits (``on_exit``), output (``on_output``), ready notifications
(``on_notify``) and the time (``tick``), and asks when it next needs the time
(``next_deadline``).

Container states::

    INSTALLED -> MOUNTED -> STARTING -> STARTED -> READY
                                 ^          |
                                 |          v (exit)
                            RECOVERING <----+----> FAILED (no restart / crash loop)
    any -> STOPPING -> STOPPED

Groups start in order; a group's containers start once their ``depends_on``
reached their status goal; the next group starts when every container of
this one met its goal or the group timed out (noted in ``goals_missed``).
Restarts follow the policy with exponential backoff; running longer than the
stable window resets the count; more than ``max_retries`` restarts in a row
is a crash loop (FAILED). Stops go in reverse start order: SIGTERM, the
container's grace period, SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pvpy import _run
from pvpy.device import _linux
from pvpy.device.runtime import Runtime
from pvpy.errors import PvpyError
from pvpy.log import get_logger
from pvpy.state.model import Container, State

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

log = get_logger("supervisor")

INSTALLED, MOUNTED, STARTING, STARTED, READY = (
    "INSTALLED", "MOUNTED", "STARTING", "STARTED", "READY",
)  # fmt: skip
RECOVERING, STOPPING, STOPPED, FAILED = "RECOVERING", "STOPPING", "STOPPED", "FAILED"
RUNNING = (STARTING, STARTED, READY)

LOG_CAP = 1 << 20  # bytes per container log file before it rotates to .1
KILL_AFTER_STOP = 5.0  # seconds after SIGKILL before we give up on a container


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
        self.check_pid: int | None = None  # readiness command in flight
        self.next_check = 0.0
        self.check_deadline = 0.0
        self.exit_code: int | None = None
        self.last_exit: str = ""
        self.log: LogSink | None = None
        self.restart_requested = False
        self.out_token = 0
        self.notify_fd: int | None = None  # read end of the notify FIFO
        self.notify_keep: int | None = None  # our write end: no EOF when writers leave
        self.notify_token = 0

    @property
    def name(self) -> str:
        return self.spec.name

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


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


class Supervisor:
    """Runs the containers of one revision."""

    def __init__(
        self,
        state: State,
        runtime: Runtime,
        *,
        on_device_request: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.runtime = runtime
        self.clock = clock
        self.on_device_request = on_device_request
        order = state.start_order()
        self.containers = {c.name: Managed(c, i) for i, c in enumerate(order)}
        self.groups = [g for g in state.groups if any(c.group == g.name for c in order)]
        self.group_index = -1
        self.group_deadline = 0.0
        self.goals_missed: list[str] = []
        self.stopping = False
        self._by_pid: dict[int, Managed] = {}
        self._by_check_pid: dict[int, Managed] = {}
        self._tokens = 0
        self.pending_switch: tuple[State, set[str]] | None = None
        # crun writes the pid file once the container runs: watching the bundle
        # dirs says STARTED at once, where polling for it cost up to 50 ms
        self.inotify_fd: int | None = None
        try:
            self.inotify_fd = _linux.inotify_init()
        except OSError as e:
            log.warning("no inotify: polling for started containers", error=str(e))

    # -- queries -------------------------------------------------------------

    def all_goals_met(self) -> bool:
        return all(m.goal_met() for m in self.containers.values())

    def all_stopped(self) -> bool:
        return all(m.pid is None for m in self.containers.values())

    def status(self) -> dict[str, Any]:
        current = self.groups[self.group_index].name if 0 <= self.group_index < len(
            self.groups
        ) else None
        return {
            "revision": self.state.revision,
            "group": current,
            "all_goals_met": self.all_goals_met(),
            "goals_missed": list(self.goals_missed),
            "containers": [
                m.to_dict() for m in sorted(self.containers.values(), key=lambda m: m.order)
            ],
        }

    def output_fds(self) -> dict[int, Managed]:
        return {m.out_fd: m for m in self.containers.values() if m.out_fd is not None}

    def watched_fds(self) -> dict[int, int]:
        """Every fd PID 1 should wait on for us, with a token unique to its opening."""
        fds: dict[int, int] = {} if self.inotify_fd is None else {self.inotify_fd: 0}
        for m in self.containers.values():
            if m.out_fd is not None:
                fds[m.out_fd] = m.out_token
            if m.notify_fd is not None:
                fds[m.notify_fd] = m.notify_token
        return fds

    def on_fd(self, fd: int) -> None:
        """An fd from ``watched_fds`` is readable."""
        if fd == self.inotify_fd:
            # drain the events; the tick after this wake-up reads the pid files
            with contextlib.suppress(OSError):
                while os.read(fd, 65536):
                    pass
            return
        for m in self.containers.values():
            if fd == m.out_fd:
                self.on_output(fd)
                return
            if fd == m.notify_fd:
                self._read_notify(m)
                return

    def _open_notify(self, m: Managed) -> None:
        """The container's notify FIFO (/run/pvpy/notify inside it): one line per message."""
        if m.notify_fd is not None:
            return
        path = self.runtime.paths.control_dir(m.name) / "notify"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.mkfifo(path, 0o620)
        m.notify_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        m.notify_keep = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._tokens += 1
        m.notify_token = self._tokens

    def _read_notify(self, m: Managed) -> None:
        assert m.notify_fd is not None
        try:
            data = os.read(m.notify_fd, 4096)
        except BlockingIOError:
            return
        for line in data.decode(errors="replace").splitlines():
            self.on_notify(m.name, line)

    def close_fds(self) -> None:
        """Close every fd we hold (shutdown)."""
        for m in self.containers.values():
            self._close(m)
        if self.inotify_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.inotify_fd)
            self.inotify_fd = None

    def _close(self, m: Managed) -> None:
        for attr in ("notify_fd", "notify_keep", "out_fd"):
            fd = getattr(m, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(m, attr, None)
        if m.log is not None:
            m.log.close()
            m.log = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Begin starting group by group (progress happens in ``tick``)."""
        self._advance_group()
        self.tick()

    def _advance_group(self) -> None:
        self.group_index += 1
        if self.group_index < len(self.groups):
            group = self.groups[self.group_index]
            self.group_deadline = self.clock() + group.timeout_ms / 1000
            log.info("group starting", group=group.name)

    def _eligible(self, m: Managed) -> bool:
        if self.stopping or m.status not in (INSTALLED, MOUNTED):
            return False
        rank = {g.name: i for i, g in enumerate(self.groups)}
        if rank[m.spec.group] > self.group_index:
            return False
        return all(self.containers[d].goal_met() for d in m.spec.depends_on)

    def tick(self) -> None:
        """Do whatever is due now: starts, restarts, readiness checks, kills, groups."""
        now = self.clock()
        if self.stopping:
            self._stop_next()
        elif self.pending_switch is not None:
            self._stop_next(self.pending_switch[1])
            self._maybe_switch()
        for m in sorted(self.containers.values(), key=lambda m: m.order):
            try:
                self._tick_one(m, now)
            except PvpyError as e:
                self._fail(m, str(e))
        if self.stopping or self.group_index >= len(self.groups):
            return
        group = self.groups[self.group_index]
        members = [m for m in self.containers.values() if m.spec.group == group.name]
        if all(m.goal_met() for m in members):
            log.info("group ready", group=group.name)
            self._advance_group()
            self.tick()
        elif now >= self.group_deadline:
            missed = [m.name for m in members if not m.goal_met()]
            self.goals_missed.extend(n for n in missed if n not in self.goals_missed)
            log.warning("group timed out", group=group.name, missed=missed)
            self._advance_group()
            self.tick()

    def _tick_one(self, m: Managed, now: float) -> None:
        if m.status == STOPPING and m.stop_deadline is not None and now >= m.stop_deadline:
            if not m.killed:
                log.warning("stop timed out, killing", container=m.name)
                self._signal(m, "KILL")
                m.killed = True
                m.stop_deadline = now + KILL_AFTER_STOP
            else:
                log.error("container did not die", container=m.name)
                m.stop_deadline = None
            return
        if self._eligible(m):
            self._launch(m)
            return
        if m.status == RECOVERING and m.next_start is not None and now >= m.next_start:
            if not self.stopping:
                self._launch(m)
            return
        if m.status in (STARTED, READY) and m.restarts and (
            now - m.started_at >= m.spec.restart.stable_window_ms / 1000
        ):
            m.restarts = 0  # it stayed up: forget earlier crashes
        if m.status == STARTING and self.runtime.init_pid(m.spec) is not None:
            self._set(m, STARTED)
        if m.status == STARTED and m.spec.readiness is not None:
            self._check_ready(m, now)

    def _set(self, m: Managed, status: str, reason: str = "") -> None:
        if m.status != status:
            log.info("container", name=m.name, status=status, reason=reason or None)
        m.status = status
        m.reason = reason

    def _fail(self, m: Managed, reason: str) -> None:
        log.error("container failed", container=m.name, reason=reason)
        self._set(m, FAILED, reason)
        if m.spec.is_host_os and not self.stopping:
            self.on_device_request("reboot", f"host OS container failed: {reason}")

    def _launch(self, m: Managed) -> None:
        self.runtime.prepare(m.spec, self.state.revision)
        self._set(m, MOUNTED)
        self._open_notify(m)
        if m.log is None:
            m.log = LogSink(self.runtime.paths.log_file(m.name))
        bundle = self.runtime.paths.bundle(m.name)
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
        self._tokens += 1
        m.out_token = self._tokens
        m.started_at = self.clock()
        m.next_start = None
        m.exit_code = None
        self._by_pid[pid] = m
        self._set(m, STARTING)

    # -- readiness ---------------------------------------------------------------

    def _check_ready(self, m: Managed, now: float) -> None:
        r = m.spec.readiness
        assert r is not None
        if m.check_pid is not None or now < m.next_check:
            return
        m.next_check = now + r.interval_ms / 1000
        if r.type == "file":
            rootfs = self.runtime.paths.bundle(m.name) / "rootfs"
            if (rootfs / r.path.lstrip("/")).exists():
                self._set(m, READY)
        elif r.type == "tcp" and m.spec.network == "host":
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setblocking(False)
                if s.connect_ex(("127.0.0.1", r.port)) in (0,):
                    self._set(m, READY)
                else:
                    # loopback answers at once: connected, refused, or in progress
                    import select

                    _, writable, _ = select.select([], [s], [], 0.05)
                    if writable and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        self._set(m, READY)
        elif r.type in ("command", "tcp"):
            argv = list(r.command) if r.type == "command" else [
                "sh", "-c", f"nc -z 127.0.0.1 {r.port} || (echo > /dev/tcp/127.0.0.1/{r.port})"
            ]  # fmt: skip
            pid = _run.spawn(self.runtime.exec_argv(m.spec, argv))
            m.check_pid = pid
            m.check_deadline = now + r.timeout_ms / 1000
            self._by_check_pid[pid] = m
        # notify: nothing to poll, on_notify() does it

    def on_notify(self, name: str, message: str) -> None:
        """A container said something on its control socket ("READY=1")."""
        m = self.containers.get(name)
        if m is None:
            return
        if message.strip() in ("READY=1", "READY") and m.status in (STARTING, STARTED):
            self._set(m, READY)

    # -- events from PID 1 --------------------------------------------------------

    def on_output(self, fd: int) -> None:
        m = self.output_fds().get(fd)
        if m is None:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if m.log is not None:
                m.log.write(data)
            return
        os.close(fd)  # EOF: crun and the container closed their ends
        m.out_fd = None

    def on_exit(self, pid: int, status: int) -> bool:
        """A child exited. Returns False when it was not one of ours."""
        checker = self._by_check_pid.pop(pid, None)
        if checker is not None:
            checker.check_pid = None
            if status == 0 and checker.status == STARTED:
                self._set(checker, READY)
            return True
        m = self._by_pid.pop(pid, None)
        if m is None:
            return False
        if m.out_fd is not None:
            self.on_output(m.out_fd)  # drain what is left
            if m.out_fd is not None:
                os.close(m.out_fd)
                m.out_fd = None
        m.pid = None
        m.last_exit = describe_status(status)
        m.exit_code = os.waitstatus_to_exitcode(status)
        try:
            self.runtime.cleanup(m.spec)
        except PvpyError as e:
            log.warning("cleanup failed", container=m.name, error=str(e))
        if m.status == STOPPING or self.stopping:
            m.stop_deadline = None
            if m.restart_requested and not self.stopping:
                m.restart_requested = False
                self._set(m, INSTALLED, "restart requested")  # eligible again
            else:
                self._set(m, STOPPED, m.last_exit)
            return True
        log.info("container exited", container=m.name, how=m.last_exit)
        if m.spec.is_host_os:
            self._host_os_exited(m, status)
            return True
        self._maybe_restart(m, status)
        return True

    def _host_os_exited(self, m: Managed, status: int) -> None:
        # reboot(2) in the host OS's pid namespace kills its init: SIGHUP means
        # restart, SIGINT halt or power off (pid_namespaces(7)). crun relays
        # the signal as its own exit status 128+n.
        code = os.waitstatus_to_exitcode(status)
        sig = -code if code < 0 else code - 128 if code > 128 else 0
        if sig == signal.SIGHUP:
            self._set(m, STOPPED, "reboot requested by the host OS")
            self.on_device_request("reboot", "host OS called reboot")
        elif sig == signal.SIGINT:
            self._set(m, STOPPED, "power off requested by the host OS")
            self.on_device_request("poweroff", "host OS called poweroff")
        elif m.spec.restart.policy != "no":
            self._maybe_restart(m, status)
        else:
            self._fail(m, f"host OS exited ({m.last_exit})")

    def _maybe_restart(self, m: Managed, status: int) -> None:
        policy = m.spec.restart
        failed = status != 0
        if policy.policy == "no" or (policy.policy == "on-failure" and not failed):
            if failed:
                self._fail(m, m.last_exit)
            else:
                self._set(m, STOPPED, m.last_exit)
            return
        now = self.clock()
        if now - m.started_at >= policy.stable_window_ms / 1000:
            m.restarts = 0
        if m.restarts >= policy.max_retries:
            self._fail(m, f"crash loop: {m.restarts} restarts, last {m.last_exit}")
            return
        delay = min(
            policy.backoff_initial_ms * (2**m.restarts), policy.backoff_max_ms
        ) / 1000
        m.restarts += 1
        m.total_restarts += 1
        m.next_start = now + delay
        self._set(m, RECOVERING, f"{m.last_exit}; restart {m.restarts} in {delay:.1f}s")

    # -- stopping -------------------------------------------------------------------

    def _signal(self, m: Managed, name: str) -> None:
        self.runtime.kill(m.name, name)

    def stop_all(self) -> None:
        """Stop every container, one at a time in reverse start order.

        Progress happens in ``tick``: the next container is asked to stop
        only when the one started after it is gone.
        """
        self.stopping = True
        self._stop_next()

    def switch(self, new_state: State, stop: set[str]) -> None:
        """Move to ``new_state``: stop the named containers (reverse order, one
        by one), then start what ``new_state`` has that is not running. The
        containers not named keep running untouched (same processes)."""
        self.pending_switch = (new_state, set(stop))
        self._stop_next(set(stop))
        self._maybe_switch()

    def _maybe_switch(self) -> None:
        if self.pending_switch is None:
            return
        new_state, names = self.pending_switch
        if any(self.containers[n].pid is not None for n in names if n in self.containers):
            return
        order = new_state.start_order()
        containers: dict[str, Managed] = {}
        for i, spec in enumerate(order):
            old = self.containers.get(spec.name)
            if old is not None and spec.name not in names and old.spec == spec:
                old.order = i
                containers[spec.name] = old
            else:
                containers[spec.name] = Managed(spec, i)
        for name, old in self.containers.items():
            if containers.get(name) is not old:
                self._close(old)
        self.containers = containers
        self.state = new_state
        self.groups = [g for g in new_state.groups if any(c.group == g.name for c in order)]
        self.group_index = -1
        self.goals_missed = []
        self.pending_switch = None
        log.info("switched", revision=new_state.revision)
        self._advance_group()

    def _stop_next(self, names: set[str] | None = None) -> None:
        for m in sorted(self.containers.values(), key=lambda m: -m.order):
            if names is not None and m.name not in names:
                continue
            if m.pid is None:
                if m.status not in (STOPPED, FAILED):
                    self._set(m, STOPPED, "stopped")
                continue
            if m.status != STOPPING:
                self.stop(m.name)
            return

    def stop(self, name: str) -> None:
        m = self.containers[name]
        if m.pid is None:
            if m.status in (RECOVERING, INSTALLED, MOUNTED):
                self._set(m, STOPPED, "stopped")
            return
        if m.status == STOPPING:
            return
        self._set(m, STOPPING)
        m.killed = False
        m.stop_deadline = self.clock() + m.spec.stop_timeout_ms / 1000
        self._signal(m, m.spec.stop_signal)

    def restart(self, name: str) -> None:
        """Stop ``name`` and start it again (PID 1's control server, ``pvpy device
        restart``). Raises KeyError for a container this revision does not have."""
        self.stop(name)
        self.containers[name].restart_requested = True

    def has(self, name: object) -> bool:
        return isinstance(name, str) and name in self.containers

    def longest_stop_timeout(self) -> float:
        """Seconds the slowest container may take to stop (PID 1's shutdown deadline)."""
        return max((m.spec.stop_timeout_ms / 1000 for m in self.containers.values()), default=0.0)

    def release(self, *, remove_cgroups: bool) -> None:
        """After every container stopped: unmount their roots, close our fds, and
        (``remove_cgroups``: in a sandbox, whose host keeps its cgroups) remove
        our cgroups. Best effort, each step on its own: PID 1 is shutting down."""
        for m in self.containers.values():
            with contextlib.suppress(Exception):
                self.runtime.cleanup(m.spec)
        self.close_fds()
        if remove_cgroups:
            with contextlib.suppress(Exception):
                self.runtime.remove_cgroups()

    def next_deadline(self) -> float | None:
        times: list[float] = []
        for m in self.containers.values():
            if m.status == RECOVERING and m.next_start is not None:
                times.append(m.next_start)
            if m.stop_deadline is not None:
                times.append(m.stop_deadline)
            if m.status == STARTING:
                # inotify wakes us when crun writes the pid file; poll only without it
                times.append(self.clock() + (0.05 if self.inotify_fd is None else 1.0))
            if m.status == STARTED and m.spec.readiness is not None:
                times.append(max(m.next_check, self.clock() + 0.01))
            if m.status in (STARTED, READY) and m.restarts:
                times.append(m.started_at + m.spec.restart.stable_window_ms / 1000)
        if 0 <= self.group_index < len(self.groups) and not self.stopping:
            times.append(self.group_deadline)
        return min(times) if times else None
