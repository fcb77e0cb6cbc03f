"""pvpy.device.supervisor driven by a fake runtime and a fake clock.

crun cannot run in a unit test (it needs root, cgroups and images; the real
thing runs in test_sandbox.py), so ``FakeRuntime`` stands in for
``pvpy.device.runtime.Runtime``: its ``run_argv`` is ``/bin/true``, a real
child that exits at once. The tests decide when and how each container "exits":
they reap that child and hand the supervisor a wait status of their choosing,
as PID 1's loop would. Time is a ``Clock`` the tests move; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvpy.device.runtime import Paths
from pvpy.device.supervisor import Supervisor
from pvpy.state.model import Container, State


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRuntime:
    """The methods the supervisor calls on its runtime, recording what was asked."""

    def __init__(self, root: Path) -> None:
        self.paths = Paths(storage=root / "storage", run=root / "run")
        self.calls: list[tuple[str, ...]] = []
        self.consoles: dict[str, str | None] = {}  # the console each bundle was given
        self.not_started: set[str] = set()  # crun has not written their pid file yet

    def prepare(self, c: Container, revision: int, *, console: str | None = None) -> Path:
        self.calls.append(("prepare", c.name))
        self.consoles[c.name] = console
        bundle = self.paths.bundle(c.name)
        bundle.mkdir(parents=True, exist_ok=True)
        return bundle

    def cleanup(self, c: Container) -> None:
        self.calls.append(("cleanup", c.name))

    def remove_cgroups(self) -> None:
        self.calls.append(("remove_cgroups",))

    def run_argv(self, c: Container) -> list[str]:
        return ["/bin/true"]

    def exec_argv(self, c: Container, argv: list[str]) -> list[str]:
        return ["/bin/true"]

    def kill(self, name: str, signal_name: str = "TERM") -> bool:
        self.calls.append(("kill", name, signal_name))
        return name not in self.not_started  # crun kill fails before crun made the state

    def init_pid(self, c: Container) -> int | None:
        return None if c.name in self.not_started else 4242

    def launches(self, name: str) -> int:
        return self.calls.count(("prepare", name))


def state_of(groups: list[dict[str, Any]] | None = None, **containers: dict[str, Any]) -> State:
    """A revision of ``containers`` (name: manifest fields), as tests/test_update.py makes them."""
    ref = {"sha256": "a" * 64, "size": 1, "format": "squashfs"}
    doc: dict[str, Any] = {
        "#spec": "pvpy-state@1",
        "revision": 1,
        "containers": {n: {"rootfs": ref, "args": ["x"], **c} for n, c in containers.items()},
    }
    if groups is not None:
        doc["groups"] = groups
    return State.from_dict(doc)


def exit_code(code: int) -> int:
    """The wait status of a process that called exit(code)."""
    return code << 8


class Rig:
    def __init__(self, root: Path) -> None:
        self.clock = Clock()
        self.runtime = FakeRuntime(root)
        self.requests: list[tuple[str, str]] = []
        self.made: list[Supervisor] = []

    def supervisor(self, state: State) -> Supervisor:
        sup = Supervisor(
            state,
            self.runtime,
            on_device_request=lambda what, why: self.requests.append((what, why)),
            clock=self.clock,
        )
        self.made.append(sup)
        return sup

    def advance(self, sup: Supervisor, seconds: float) -> None:
        self.clock.now += seconds
        sup.tick()

    def exit(self, sup: Supervisor, name: str, status: int) -> None:
        """The container's crun process ends with ``status``, as PID 1 reports it."""
        pid = sup.containers[name].pid
        assert pid is not None, f"{name} is not running"
        os.waitpid(pid, 0)  # the real /bin/true; the status is the test's
        assert sup.on_exit(pid, status)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    for sup in rig.made:  # reap the children of containers left "running"
        for m in sup.containers.values():
            if m.pid is not None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(m.pid, 0)
        sup.close_fds()


def statuses(sup: Supervisor) -> dict[str, str]:
    return {n: m.status for n, m in sup.containers.items()}


def restart_delays(rig: Rig, sup: Supervisor, name: str, crashes: int) -> list[float]:
    """Crash ``name`` right after each start; the delay before each restart."""
    delays = []
    for _ in range(crashes):
        rig.exit(sup, name, exit_code(1))
        m = sup.containers[name]
        assert m.status == "RECOVERING" and m.next_start is not None
        delays.append(m.next_start - rig.clock.now)
        assert sup.next_deadline() == m.next_start
        launched = rig.runtime.launches(name)
        rig.advance(sup, delays[-1] - 0.001)
        assert rig.runtime.launches(name) == launched  # not before its time
        rig.advance(sup, 0.001)
        assert rig.runtime.launches(name) == launched + 1
        sup.tick()  # the fake pid file is there: STARTED
        assert m.status == "STARTED"
    return delays


# -- restarts --------------------------------------------------------------------------


def test_restart_backoff_doubles_up_to_the_max(rig: Rig) -> None:
    policy = {"backoff_initial_ms": 1000, "backoff_max_ms": 5000, "max_retries": 10}
    sup = rig.supervisor(state_of(app={"restart": policy}))
    sup.start()
    sup.tick()
    assert statuses(sup) == {"app": "STARTED"}
    assert restart_delays(rig, sup, "app", 5) == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert sup.containers["app"].total_restarts == 5


def test_crash_loop_fails_the_container_and_leaves_the_others_running(rig: Rig) -> None:
    sup = rig.supervisor(state_of(bad={"restart": {"max_retries": 2}}, good={}))
    sup.start()
    sup.tick()
    good_pid = sup.containers["good"].pid
    restart_delays(rig, sup, "bad", 2)
    rig.exit(sup, "bad", exit_code(1))  # the third crash in a row: no third restart
    bad = sup.containers["bad"]
    assert bad.status == "FAILED" and bad.reason.startswith("crash loop: 2 restarts")
    assert bad.pid is None and rig.runtime.launches("bad") == 3
    rig.advance(sup, 3600)
    assert rig.runtime.launches("bad") == 3  # FAILED stays failed
    good = sup.containers["good"]
    assert (good.status, good.pid, good.total_restarts) == ("STARTED", good_pid, 0)
    assert rig.runtime.launches("good") == 1
    assert rig.requests == []  # an app failing is no reason to reboot


def test_running_past_the_stable_window_forgets_earlier_crashes(rig: Rig) -> None:
    policy = {"max_retries": 1, "backoff_initial_ms": 1000, "stable_window_ms": 10_000}
    sup = rig.supervisor(state_of(app={"restart": policy}))
    sup.start()
    sup.tick()
    restart_delays(rig, sup, "app", 1)
    m = sup.containers["app"]
    assert m.restarts == 1
    assert sup.next_deadline() == m.started_at + 10  # the tick that forgets comes on time
    rig.advance(sup, 9.9)
    assert m.restarts == 1
    rig.advance(sup, 0.1)
    assert m.restarts == 0
    # max_retries 1 would make this a crash loop, had the count not been reset
    rig.exit(sup, "app", exit_code(1))
    assert m.status == "RECOVERING" and m.next_start == rig.clock.now + 1.0
    assert m.total_restarts == 2


def test_crash_inside_the_stable_window_counts(rig: Rig) -> None:
    policy = {"max_retries": 1, "backoff_initial_ms": 1000, "stable_window_ms": 10_000}
    sup = rig.supervisor(state_of(app={"restart": policy}))
    sup.start()
    sup.tick()
    restart_delays(rig, sup, "app", 1)
    rig.advance(sup, 9.9)
    rig.exit(sup, "app", exit_code(1))
    assert sup.containers["app"].status == "FAILED"


def test_restart_stops_and_starts_again_without_counting_a_crash(rig: Rig) -> None:
    sup = rig.supervisor(state_of(app={"stop_timeout_ms": 3000}))
    sup.start()
    sup.tick()
    first = sup.containers["app"].pid
    sup.restart("app")
    m = sup.containers["app"]
    assert m.status == "STOPPING" and ("kill", "app", "TERM") in rig.runtime.calls
    assert sup.next_deadline() == rig.clock.now + 3.0  # SIGKILL if it ignores TERM
    rig.exit(sup, "app", 15)  # killed by SIGTERM
    assert (m.status, m.reason) == ("INSTALLED", "restart requested")
    sup.tick()
    assert m.status == "STARTING" and m.pid not in (None, first)
    # no crash: the crash-loop count stays 0; the total that status shows counts it
    assert (m.restarts, m.total_restarts) == (0, 1)
    with pytest.raises(KeyError):
        sup.restart("nosuch")


def test_a_stop_that_times_out_ends_in_sigkill(rig: Rig) -> None:
    sup = rig.supervisor(state_of(app={"stop_timeout_ms": 3000, "stop_signal": "INT"}))
    sup.start()
    sup.stop("app")
    assert rig.runtime.calls[-1] == ("kill", "app", "INT")
    rig.advance(sup, 2.9)
    assert rig.runtime.calls[-1] == ("kill", "app", "INT")
    rig.advance(sup, 0.1)
    assert rig.runtime.calls[-1] == ("kill", "app", "KILL")
    rig.exit(sup, "app", 9)
    assert sup.containers["app"].status == "STOPPED" and sup.all_stopped()


def test_a_stop_asked_while_crun_still_creates_the_container_is_sent_once_it_runs(
    rig: Rig,
) -> None:
    # (the soak run found it: a failed host OS try asked apps still STARTING to stop;
    # `crun kill` had no state yet, the TERM was lost and SIGKILL came 10 s later)
    sup = rig.supervisor(state_of(app={"stop_timeout_ms": 10000}))
    rig.runtime.not_started.add("app")
    sup.start()
    assert statuses(sup) == {"app": "STARTING"}
    sup.stop("app")
    assert rig.runtime.calls[-1] == ("kill", "app", "TERM")  # failed: no state yet
    assert (deadline := sup.next_deadline()) is not None and deadline <= rig.clock.now + 0.05
    rig.runtime.not_started.clear()  # crun wrote the container's state and pid file
    rig.advance(sup, 0.05)
    assert [c for c in rig.runtime.calls if c[0] == "kill"] == [("kill", "app", "TERM")] * 2
    assert sup.containers["app"].signal_unsent is None
    rig.advance(sup, 1.0)
    assert ("kill", "app", "KILL") not in rig.runtime.calls  # sent once, no retry, no SIGKILL


def test_longest_stop_timeout(rig: Rig) -> None:
    sup = rig.supervisor(state_of(a={"stop_timeout_ms": 2000}, b={"stop_timeout_ms": 7500}))
    assert sup.longest_stop_timeout() == 7.5
    assert rig.supervisor(state_of(a={})).longest_stop_timeout() == 10.0  # the default


# -- start order ------------------------------------------------------------------------

GROUPS = [{"name": "root", "timeout_ms": 5000}, {"name": "app", "timeout_ms": 5000}]


def test_next_group_starts_when_the_previous_met_its_goals(rig: Rig) -> None:
    sup = rig.supervisor(state_of(GROUPS, base={"group": "root"}, app={"group": "app"}))
    rig.runtime.not_started.add("base")
    sup.start()
    assert statuses(sup) == {"base": "STARTING", "app": "INSTALLED"}
    assert sup.status()["group"] == "root"
    rig.advance(sup, 4.9)
    assert statuses(sup) == {"base": "STARTING", "app": "INSTALLED"}
    rig.runtime.not_started.clear()  # crun wrote base's pid file
    sup.tick()
    assert statuses(sup) == {"base": "STARTED", "app": "STARTING"}
    assert sup.status()["group"] == "app"
    sup.tick()
    assert statuses(sup) == {"base": "STARTED", "app": "STARTED"}
    assert sup.all_goals_met() and sup.goals_missed == []
    assert sup.group_index == len(sup.groups)  # every group is done


def test_group_timeout_starts_the_next_group_and_notes_the_miss(rig: Rig) -> None:
    sup = rig.supervisor(state_of(GROUPS, base={"group": "root"}, app={"group": "app"}))
    rig.runtime.not_started.add("base")
    sup.start()
    assert sup.next_deadline() == rig.clock.now + 1.0  # polls the pid file meanwhile
    rig.advance(sup, 4.999)
    assert rig.runtime.launches("app") == 0
    rig.advance(sup, 0.001)
    assert statuses(sup) == {"base": "STARTING", "app": "STARTING"}
    assert sup.goals_missed == ["base"] and sup.status()["goals_missed"] == ["base"]


def test_depends_on_waits_for_the_dependency_goal(rig: Rig) -> None:
    db = {"status_goal": "READY", "readiness": {"type": "notify"}}
    sup = rig.supervisor(state_of(db=db, web={"depends_on": ["db"]}))
    sup.start()
    rig.advance(sup, 1)
    assert statuses(sup) == {"db": "STARTED", "web": "INSTALLED"}  # STARTED is not db's goal
    # the container says READY on its notify FIFO, as `echo READY=1 > $PVPY_NOTIFY` does
    fifo = os.open(rig.runtime.paths.control_dir("db") / "notify", os.O_WRONLY | os.O_NONBLOCK)
    os.write(fifo, b"READY=1\n")
    os.close(fifo)
    notify_fd = sup.containers["db"].notify_fd
    assert notify_fd is not None and notify_fd in sup.watched_fds()
    sup.on_fd(notify_fd)
    assert statuses(sup) == {"db": "READY", "web": "INSTALLED"}
    sup.tick()
    assert statuses(sup) == {"db": "READY", "web": "STARTING"}


def test_host_os_failure_asks_for_a_reboot(rig: Rig) -> None:
    sup = rig.supervisor(state_of(os={"role": "host-os"}))
    sup.start()
    rig.exit(sup, "os", exit_code(1))
    assert sup.containers["os"].status == "FAILED"
    assert [what for what, _ in rig.requests] == ["reboot"]


def test_release_cleans_up_every_container(rig: Rig) -> None:
    sup = rig.supervisor(state_of(a={}, b={}))
    sup.start()
    for name in ("a", "b"):
        rig.exit(sup, name, exit_code(0))
    rig.runtime.calls.clear()
    sup.release(remove_cgroups=True)
    assert rig.runtime.calls == [("cleanup", "a"), ("cleanup", "b"), ("remove_cgroups",)]
    assert sup.watched_fds() == {}


def test_each_container_has_a_console_kept_across_restarts_and_read_into_its_log(
    rig: Rig,
) -> None:
    sup = rig.supervisor(state_of(app={"restart": {"policy": "always"}}, other={}))
    sup.start()
    app = sup.containers["app"]
    path = rig.runtime.consoles["app"]
    assert path is not None and path.startswith("/dev/pts/")
    assert rig.runtime.consoles["other"] not in (None, path)
    assert app.console is not None and app.console.master in sup.watched_fds()
    # the container writes to its /dev/console: PID 1 copies it to the container's log
    slave = os.open(path, os.O_WRONLY | os.O_NOCTTY)
    os.write(slave, b"booting\n")
    os.close(slave)
    sup.on_fd(app.console.master)
    assert rig.runtime.paths.log_file("app").read_bytes() == b"booting\n"
    rig.exit(sup, "app", exit_code(1))
    rig.advance(sup, 60)
    assert rig.runtime.launches("app") == 2 and rig.runtime.consoles["app"] == path  # same pty
    # PID 1 cannot wait on it: closed, the container runs on without
    master = app.console.master
    sup.drop_fd(master)
    assert app.console is None and master not in sup.watched_fds()
    # a container gone for good (not in the new revision) has its console closed
    other = sup.containers["other"]
    assert other.console is not None
    other_master = other.console.master
    sup.switch(state_of(app={"restart": {"policy": "always"}}), {"other"})
    rig.exit(sup, "other", exit_code(0))
    sup.tick()
    assert "other" not in sup.containers and other.console is None
    assert other_master not in sup.watched_fds()
