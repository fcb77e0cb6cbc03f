"""The supervisor: runs one revision's containers and keeps them at their goals.

It is event driven and never blocks for long: PID 1's loop
(``pvpy.device.pid1``) hands it child exits (``on_exit``), readable fds
(``on_fd``: output, consoles, ready notifications) and the time (``tick``), and asks
when it next needs the time (``next_deadline``).

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

Beside this module: ``managed`` (one container's record and restart
arithmetic), ``launcher`` (crun processes and the fds PID 1 waits on),
``readiness`` (READY checks, notify FIFO), ``logsink`` (capped logs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

from pvpy.device.launcher import Launcher
from pvpy.device.managed import (
    FAILED,
    INSTALLED,
    MOUNTED,
    READY,
    RECOVERING,
    STARTED,
    STARTING,
    STOPPED,
    STOPPING,
    Managed,
    carry_over,
)
from pvpy.device.readiness import ReadinessChecks, read_notify
from pvpy.errors import PvpyError
from pvpy.log import get_logger
from pvpy.state.model import State

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

    from pvpy.device.runtime import ContainerRuntime

log = get_logger("supervisor")

KILL_AFTER_STOP = 5.0  # seconds after SIGKILL before we give up on a container


class Supervisor:
    """Runs the containers of one revision.

    About 360 lines, on purpose: it is the one owner of the containers' state
    machine, and most of its events move several containers at once (group
    order, ``depends_on``, reverse stop order, switching revisions); split
    further, its parts would hand ``containers`` and the group position back
    and forth. What needs only one container lives beside it: the record and
    its restart arithmetic in ``managed``, processes and fds in ``launcher``,
    READY checks in ``readiness``, logs in ``logsink``.
    """

    def __init__(
        self,
        state: State,
        runtime: ContainerRuntime,
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
        self.pending_switch: tuple[State, set[str]] | None = None
        self.launcher = Launcher(runtime, clock)
        self.readiness = ReadinessChecks(runtime)

    # -- queries -------------------------------------------------------------

    def all_goals_met(self) -> bool:
        return all(m.goal_met() for m in self.containers.values())

    def all_stopped(self) -> bool:
        return all(m.pid is None for m in self.containers.values())

    def status(self) -> dict[str, Any]:
        current = (
            self.groups[self.group_index].name if 0 <= self.group_index < len(self.groups) else None
        )
        return {
            "revision": self.state.revision,
            "group": current,
            "all_goals_met": self.all_goals_met(),
            "goals_missed": list(self.goals_missed),
            "containers": [
                m.to_dict() for m in sorted(self.containers.values(), key=lambda m: m.order)
            ],
        }

    def revisions_in_use(self) -> set[int]:
        """The revisions whose trails hold the writable layers and volumes of running
        containers (``Managed.disk_revision``): GC must not remove them."""
        return {
            m.disk_revision
            for m in self.containers.values()
            if m.disk_revision is not None and m.uses_revision_disks()
        }

    def has(self, name: object) -> bool:
        return isinstance(name, str) and name in self.containers

    def longest_stop_timeout(self) -> float:
        """Seconds the slowest container may take to stop (PID 1's shutdown deadline)."""
        return max((m.spec.stop_timeout_ms / 1000 for m in self.containers.values()), default=0.0)

    # -- fds PID 1 waits on for us ---------------------------------------------

    def output_fds(self) -> dict[int, Managed]:
        return {m.out_fd: m for m in self.containers.values() if m.out_fd is not None}

    def watched_fds(self) -> dict[int, int]:
        """Every fd PID 1 should wait on for us, with a token unique to its opening."""
        return self.launcher.watched_fds(self.containers.values())

    def on_fd(self, fd: int) -> None:
        """An fd from ``watched_fds`` is readable."""
        if self.launcher.on_inotify(fd):
            return
        for m in self.containers.values():
            if fd == m.out_fd:
                self.on_output(fd)
                return
            if m.console is not None and fd == m.console.master:
                m.read_console()
                return
            if fd == m.notify_fd:
                for line in read_notify(fd):
                    self.on_notify(m.name, line)
                return

    def drop_fd(self, fd: int) -> None:
        """PID 1 cannot wait on ``fd`` (from ``watched_fds``): close it. The container
        runs on; what came through that fd (output, notify lines) is lost, a lost
        inotify fd means polling for pid files."""
        if fd == self.launcher.inotify_fd:
            self.launcher.close()
            return
        for m in self.containers.values():
            console = m.console.master if m.console is not None else None
            if fd in (m.out_fd, m.notify_fd, console):
                what = "output" if fd == m.out_fd else "console" if fd == console else "notify"
                log.error("container fd dropped", container=m.name, what=what)
                m.drop_fd(fd)
                return

    def inject_bad_fd(self) -> bool:
        """Test-only fault (PVPY_TEST_FAULTS): the first container's notify fd turns
        into a regular file, which epoll refuses (EPERM). False: no such container."""
        m = next((m for m in self.containers.values() if m.notify_fd is not None), None)
        if m is None or m.notify_fd is None:
            return False
        regular = os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(regular, m.notify_fd, inheritable=False)
        os.close(regular)
        m.notify_token = -m.notify_token - 1  # a new opening: PID 1 registers it anew
        return True

    def on_output(self, fd: int) -> None:
        m = self.output_fds().get(fd)
        if m is not None:
            m.read_output()

    def close_fds(self) -> None:
        """Close every fd we hold (shutdown)."""
        for m in self.containers.values():
            m.close_fds()
        self.launcher.close()

    # -- starting --------------------------------------------------------------

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
        if (
            m.status == STOPPING
            and m.signal_unsent
            and m.pid is not None
            and self.runtime.init_pid(m.spec) is not None  # crun made its state: send it now
        ):
            self._signal(m, m.signal_unsent)
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
        if m.status in (STARTED, READY) and m.restarts and m.ran_stable(now):
            m.restarts = 0  # it stayed up: forget earlier crashes
        if m.status == STARTING and self.runtime.init_pid(m.spec) is not None:
            self._set(m, STARTED)
        if m.status == STARTED and m.spec.readiness is not None and self.readiness.poll(m, now):
            self._set(m, READY)

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
        console = self.launcher.open_console(m)
        self.runtime.prepare(m.spec, self.state.revision, console=console)
        self._set(m, MOUNTED)
        self.launcher.spawn(m)
        m.disk_revision = self.state.revision
        self._set(m, STARTING)

    # -- events from PID 1 --------------------------------------------------------

    def on_notify(self, name: str, message: str) -> None:
        """A container said something on its notify FIFO ("READY=1")."""
        m = self.containers.get(name)
        if m is None:
            return
        if message.strip() in ("READY=1", "READY") and m.status in (STARTING, STARTED):
            self._set(m, READY)

    def on_exit(self, pid: int, status: int) -> bool:
        """A child exited. Returns False when it was not one of ours."""
        checker = self.readiness.on_exit(pid)
        if checker is not None:
            if status == 0 and checker.status == STARTED:
                self._set(checker, READY)
            return True
        m = self.launcher.exited(pid)
        if m is None:
            return False
        m.record_exit(status)
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
        delay = m.schedule_restart(self.clock())
        if delay is None:
            self._fail(m, f"crash loop: {m.restarts} restarts, last {m.last_exit}")
            return
        self._set(m, RECOVERING, f"{m.last_exit}; restart {m.restarts} in {delay:.1f}s")

    # -- stopping -------------------------------------------------------------------

    def _signal(self, m: Managed, name: str) -> None:
        # A container asked to stop while crun is still creating it has no state for
        # `crun kill` yet: the signal is kept and sent once its init runs (see tick),
        # instead of being lost and the stop waiting out its timeout for SIGKILL.
        m.signal_unsent = None if self.runtime.kill(m.name, name) else name

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
        self.containers = carry_over(self.containers, order, names)
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
        """Ask ``name`` to stop: its stop signal now, SIGKILL after its stop timeout.
        Raises KeyError for a container this revision does not have."""
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
        m = self.containers[name]
        m.restart_requested = True
        m.total_restarts += 1  # what status shows: restarts asked for count too

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
        """When ``tick`` next has something to do (monotonic seconds), or None."""
        times: list[float] = []
        for m in self.containers.values():
            if m.status == RECOVERING and m.next_start is not None and not self.stopping:
                # (while stopping, tick launches nothing: a past next_start would spin)
                times.append(m.next_start)
            if m.stop_deadline is not None:
                times.append(m.stop_deadline)
            if m.status == STOPPING and m.signal_unsent and m.pid is not None:
                times.append(self.clock() + 0.05)  # until crun made its state (a stop only)
            if m.status == STARTING:
                times.append(self.clock() + self.launcher.poll_interval())
            if m.status == STARTED and m.spec.readiness is not None:
                times.append(max(m.next_check, self.clock() + 0.01))
            if m.status in (STARTED, READY) and m.restarts:
                times.append(m.started_at + m.spec.restart.stable_window_ms / 1000)
        if 0 <= self.group_index < len(self.groups) and not self.stopping:
            times.append(self.group_deadline)
        return min(times) if times else None
