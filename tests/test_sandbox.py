"""PID 1 and the supervisor, booted for real: sandbox namespaces, crun, busybox.

Every test here runs `pvpy device run` as root; each device is powered off
(or killed) at the end of its test.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.device import DEMO, HOSTOS, app, build_revision

pytestmark = pytest.mark.root


def ordered(events: list[dict[str, Any]], status: str) -> list[str]:
    return [
        e["name"] for e in events if e.get("event") == "container" and e.get("status") == status
    ]


def test_boot_start_order_and_reverse_stop_order(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    trap = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "db": app(trap, group="platform"),
            "api": app(trap, depends_on=["cache"]),
            "cache": app(trap),
            "ui": app(trap, depends_on=["api"]),
        },
    )
    device = sandbox(rev)
    status = device.wait_goals()
    assert status["revision"] == 1 and status["pid"] == 1
    assert {c["name"]: c["status"] for c in status["containers"]} == {
        "hostos": "STARTED",
        "db": "STARTED",
        "cache": "STARTED",
        "api": "STARTED",
        "ui": "STARTED",
    }
    assert device.stop() == 0
    events = device.events()
    started = ordered(events, "STARTED")
    assert started == ["hostos", "db", "cache", "api", "ui"]
    stopping = ordered(events, "STOPPING")
    assert stopping == list(reversed(started))
    stopped = ordered(events, "STOPPED")
    assert stopped == list(reversed(started))
    assert any(e.get("event") == "goodbye" and e.get("action") == "poweroff" for e in events)


def test_stop_signal_reaches_an_init_that_ignores_sigterm(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    """A container's PID 1 without a SIGTERM handler ignores SIGTERM: "deaf" is
    killed at its stop timeout, "usr1" stops on the stop_signal it handles."""
    deaf = "trap 'exit 0' USR1; while :; do sleep 1 & wait $!; done"  # no TERM handler
    rev = build_revision(tmp_path, signing_dir, 1, {
        "hostos": HOSTOS,
        "deaf": app(deaf, stop_timeout_ms="1s"),
        "usr1": app(deaf, stop_signal="USR1", stop_timeout_ms="60s"),
    })  # fmt: skip
    device = sandbox(rev)
    device.wait_goals()
    assert device.stop() == 0
    events = device.events()
    killed = {e["container"] for e in events if e.get("event") == "stop timed out, killing"}
    assert killed == {"deaf"}
    assert ordered(events, "STOPPED") == ["usr1", "deaf", "hostos"]


def test_app_sees_none_of_the_hosts_processes(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "peek": app(
                "ls /proc | grep -c '^[0-9]' > /tmp/count; "
                "echo procs=$(cat /tmp/count) self=$$; ps -o pid,comm; sleep 3600"
            ),
        },
    )
    device = sandbox(rev)
    device.wait_goals()
    log = device.storage / "logs" / "peek.log"
    deadline = time.monotonic() + 10
    while "procs=" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "peek never wrote its process count"
        time.sleep(0.1)
    text = log.read_text()
    # only sh (pid 1), ls and grep existed: nothing of the host, nor of the other containers
    count = int(text.split("procs=")[1].split()[0])
    assert count <= 3, text
    assert "self=1" in text
    for host_thing in ("pvpy", "crun", "python", "init"):
        assert host_thing not in text.split("self=1")[1], text


def test_memory_limit_is_enforced(tmp_path: Path, sandbox: Any, signing_dir: Path) -> None:
    # dd's 64 MiB block buffer does not fit in 16 MiB: the kernel OOM-kills it.
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "hog": app(
                "sleep 1; dd if=/dev/zero of=/dev/null bs=64M count=1; echo dd=$?; sleep 3600",
                cgroup={"memory_max": "16M", "pids_max": 32},
            ),
        },
    )
    device = sandbox(rev)
    device.wait_goals()
    log = device.storage / "logs" / "hog.log"
    deadline = time.monotonic() + 15
    while "dd=" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, device.tail()
        time.sleep(0.1)
    assert "dd=137" in log.read_text()  # 128 + SIGKILL from the OOM killer
    limit = subprocess.run(
        [
            "sh",
            "-c",
            f"cat /sys/fs/cgroup/memory/pvpy-{device.run_dir.name}/hog/memory.limit_in_bytes"
            f" /sys/fs/cgroup/pvpy-{device.run_dir.name}/hog/memory.max 2>/dev/null",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert limit and int(limit[0]) == 16 * 1024 * 1024


def test_restart_backoff_and_crash_loop_limit(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    trap = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "steady": app(trap),
            "crasher": app(
                "echo crashing; exit 3",
                restart={
                    "policy": "always",
                    "max_retries": 4,
                    "backoff_initial_ms": "200ms",
                    "backoff_max_ms": "1s",
                    "stable_window_ms": "30s",
                },
            ),
        },
    )
    device = sandbox(rev)
    device.wait_for(
        "steady started",
        lambda s: any(c["name"] == "steady" and c["status"] == "STARTED" for c in s["containers"]),
    )
    steady_pid = device.container("steady")["pid"]
    failed = device.wait_for(
        "crash loop detected",
        lambda s: any(c["name"] == "crasher" and c["status"] == "FAILED" for c in s["containers"]),
    )
    crasher = next(c for c in failed["containers"] if c["name"] == "crasher")
    assert crasher["restarts"] == 4
    assert "crash loop" in crasher["reason"]
    # the crash loop did not disturb its neighbour
    steady = next(c for c in failed["containers"] if c["name"] == "steady")
    assert steady["status"] == "STARTED" and steady["pid"] == steady_pid and steady["restarts"] == 0

    starts = [
        e["timestamp"]
        for e in device.events()
        if e.get("event") == "container"
        and e.get("name") == "crasher"
        and e.get("status") == "STARTING"
    ]
    assert len(starts) == 5
    times = [_seconds(t) for t in starts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8, 1.0], strict=True):
        assert expected <= gap < expected + 0.6, gaps


def _seconds(timestamp: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def test_stable_window_resets_the_retry_count(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    # Runs 1.5 s, then fails: longer than its 1 s stable window, so it is never a crash loop.
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "flaky": app(
                "sleep 1.5; exit 1",
                restart={
                    "policy": "on-failure",
                    "max_retries": 1,
                    "backoff_initial_ms": "100ms",
                    "stable_window_ms": "1s",
                },
            ),
        },
    )
    device = sandbox(rev)
    device.wait_for(
        "three restarts",
        lambda s: any(c["name"] == "flaky" and c["restarts"] >= 3 for c in s["containers"]),
        timeout=30,
    )
    assert device.container("flaky")["status"] != "FAILED"


def test_orphans_are_reaped(tmp_path: Path, sandbox: Any, signing_dir: Path) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS})
    device = sandbox(rev)
    device.wait_goals()
    pid1 = device.pid1()
    # 100 grandchildren in PID 1's namespace whose parents exit at once: orphans.
    subprocess.run(
        [
            "nsenter",
            "--target",
            str(pid1),
            "--pid",
            "--mount",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "for i in $(seq 100); do (sleep 1 &) ; done",
        ],
        check=True,
        timeout=30,
    )
    children = _children(pid1)
    orphans = [p for p in children if _comm(p) == "sleep"]
    assert len(orphans) == 100, f"orphans were not re-parented to PID 1: {len(orphans)}"
    deadline = time.monotonic() + 10
    while True:
        zombies = [p for p in _children(pid1) if _state(p) == "Z"]
        sleepers = [p for p in _children(pid1) if _comm(p) == "sleep"]
        if not zombies and not sleepers:
            break
        assert time.monotonic() < deadline, f"{len(zombies)} zombies, {len(sleepers)} sleeping"
        time.sleep(0.1)
    assert device.status()["all_goals_met"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def test_pid1_survives_signal_storms_and_loop_exceptions(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    trap = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "app": app(trap)})
    device = sandbox(rev)
    before = device.wait_goals()
    pid1 = device.pid1()
    pids = {c["name"]: c["pid"] for c in before["containers"]}
    for _ in range(500):
        for sig in (signal.SIGHUP, signal.SIGCHLD, signal.SIGWINCH, signal.SIGALRM, signal.SIGPIPE):
            os.kill(pid1, sig)
    for _ in range(3):
        assert device.request({"cmd": "inject", "fault": "raise"})["ok"]
        time.sleep(0.3)
    after = device.status()
    assert after["all_goals_met"] and after["pending"] is None
    assert {c["name"]: c["pid"] for c in after["containers"]} == pids
    events = device.events()
    assert sum(e.get("event") == "loop iteration failed; going on" for e in events) == 3
    assert device.stop() == 0


def test_watchdog_fed_while_healthy_and_not_when_wedged(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS})
    dog = tmp_path / "watchdog"
    dog.write_bytes(b"")
    device = sandbox(rev, "--watchdog", str(dog), "--watchdog-interval", "0.2")
    device.wait_goals()
    size = dog.stat().st_size
    time.sleep(1.0)
    assert dog.stat().st_size >= size + 3, "watchdog not fed while healthy"
    device.request({"cmd": "inject", "fault": "hang"})
    time.sleep(0.5)
    wedged = dog.stat().st_size
    time.sleep(1.5)
    assert dog.stat().st_size == wedged, "watchdog still fed by a wedged loop"


def test_host_os_reboot_reboots_the_device(tmp_path: Path, sandbox: Any, signing_dir: Path) -> None:
    hostos = {**HOSTOS, "args": ["/bin/sh", "-c", "sleep 1; reboot -f"]}
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": hostos})
    device = sandbox(rev, "--max-boots", "2")
    assert device.proc is not None
    device.proc.wait(60)
    events = device.events()
    boots = [e for e in events if e.get("event") == "boot"]
    assert len(boots) == 2
    assert (
        sum(
            e.get("event") == "shutdown requested" and e.get("reason") == "host OS called reboot"
            for e in events
        )
        == 2
    )
    assert [e.get("event") for e in events if e.get("logger") == "sandbox"].count("reboot") == 2


def test_host_os_poweroff_powers_off(tmp_path: Path, sandbox: Any, signing_dir: Path) -> None:
    hostos = {**HOSTOS, "args": ["/bin/sh", "-c", "sleep 1; poweroff -f"]}
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": hostos})
    device = sandbox(rev)
    assert device.proc is not None
    assert device.proc.wait(60) == 0
    events = device.events()
    assert any(e.get("reason") == "host OS called poweroff" for e in events)
    assert any(e.get("event") == "power off" for e in events)


def test_runc_runs_the_same_bundle(tmp_path: Path, sandbox: Any, signing_dir: Path) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "app": app("sleep 3600")})
    device = sandbox(rev, "--runtime", "runc")
    status = device.wait_goals()
    assert all(c["status"] == "STARTED" for c in status["containers"])


def test_readiness_checks_and_group_timeout(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    idle = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "by-file": app(
                f"sleep 1; touch /tmp/ready; {idle}",
                status_goal="READY",
                readiness={"type": "file", "path": "/tmp/ready", "interval_ms": "100ms"},
            ),
            "by-command": app(
                f"sleep 1; echo ok > /tmp/ok; {idle}",
                status_goal="READY",
                readiness={
                    "type": "command",
                    "command": ["sh", "-c", "echo readiness-noise-$((6*7)); cat /tmp/ok"],
                    "interval_ms": "200ms",
                },
            ),
            "by-tcp": app(
                "sleep 1; exec httpd -f -p 127.0.0.1:18931 -h /tmp",
                status_goal="READY",
                readiness={"type": "tcp", "port": 18931, "interval_ms": "100ms"},
            ),
            "by-notify": app(
                f"sleep 1; echo READY=1 > $PVPY_NOTIFY; {idle}",
                status_goal="READY",
                readiness={"type": "notify"},
            ),
            "never": app(
                idle,
                group="platform",
                status_goal="READY",
                readiness={"type": "file", "path": "/nope"},
            ),
        },
        groups=[{"name": "root"}, {"name": "platform", "timeout_ms": "2s"}, {"name": "app"}],
    )
    device = sandbox(rev)
    status = device.wait_for(
        "the app group ready",
        lambda s: (
            [c["status"] for c in s["containers"] if c["name"].startswith("by-")] == ["READY"] * 4
        ),
        timeout=40,
    )
    assert status["goals_missed"] == ["never"]
    assert not status["all_goals_met"]
    # a check's own output is no news: not on PID 1's console (the sandbox's log)
    assert "readiness-noise-42" not in device.log_path.read_text(errors="replace")
    never = next(c for c in status["containers"] if c["name"] == "never")
    assert never["status"] == "STARTED"
    events = device.events()
    assert any(e.get("event") == "group timed out" and e.get("missed") == ["never"] for e in events)
    # READY came from the checks, not from the start: each app waited its second
    ready = {
        e["name"]: e["timestamp"]
        for e in events
        if e.get("event") == "container" and e.get("status") == "READY"
    }
    started = {
        e["name"]: e["timestamp"]
        for e in events
        if e.get("event") == "container" and e.get("status") == "STARTED"
    }
    for name in ("by-file", "by-command", "by-tcp", "by-notify"):
        assert _seconds(ready[name]) - _seconds(started[name]) >= 0.8, name


def test_unverifiable_revision_falls_back_to_an_older_one(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    from pvpy.store import Storage
    from pvpy.trust import read_revision_dir

    idle = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    rev1 = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "app": app(idle)})
    # revision 2's app has its own image (the web tree), so corrupting it spares revision 1
    app2 = {
        **app("echo v2; " + idle),
        "rootfs": {"dir": str(DEMO / "build" / "web"), "all_root": True},
    }
    rev2 = build_revision(tmp_path, signing_dir, 2, {"hostos": HOSTOS, "app": app2})
    device = sandbox(rev1)
    device.wait_goals()
    device.stop()
    # Install revision 2 by hand, make it the one to boot, then corrupt its app image.
    storage = Storage(device.storage)
    state, sig, _ = read_revision_dir(rev2)
    for obj in (rev2 / "objects").iterdir():
        if not obj.name.startswith("."):
            storage.objects.put_file(obj, expected=obj.name)
    storage.install_revision(2, state, sig)
    (device.storage / "bootenv").write_text("pv_rev=2\n")
    from pvpy.state import parse_unverified

    image = storage.objects.path(parse_unverified(state).container("app").rootfs.sha256)
    os.chmod(image, 0o644)
    with open(image, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    device.start()
    status = device.wait_goals()
    assert status["revision"] == 1
    assert "revision 2" in status["boot_error"] and "corrupt" in status["boot_error"]


def test_no_runnable_revision_keeps_pid1_up(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS})
    device = sandbox(rev)
    device.wait_goals()
    device.stop()
    (device.storage / "trails" / "1" / "state.sig.json").write_text("{}")
    device.start()
    status = device.wait_for(
        "PID 1 up without containers", lambda s: s.get("boot_error") is not None
    )
    assert status["revision"] is None and status["containers"] == []
    assert "state.sig.json" in status["boot_error"]
    time.sleep(1)
    assert device.status()["pid"] == 1  # still there, still answering
    assert device.stop() == 0


def test_failing_factory_revision_reports_error_and_runs_on(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    idle = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "fine": app(idle),
            "broken": app(
                "exit 2",
                restart={"policy": "on-failure", "max_retries": 1, "backoff_initial_ms": "100ms"},
            ),
        },
    )
    device = sandbox(rev)
    status = device.wait_for("the factory revision reported", lambda s: bool(s["updates"]))
    record = status["updates"][0]
    assert record["revision"] == 1 and record["status"] == "ERROR"
    assert "factory revision failing" in record["reason"] and "broken" in record["reason"]
    assert status["revision"] == 1 and status["pending"] is None
    fine = next(c for c in status["containers"] if c["name"] == "fine")
    assert fine["status"] == "STARTED"


def test_signal_policy_and_clean_signal_mask(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    # The app prints its signal mask and ignored set: PID 1's must not leak into it.
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "hostos": HOSTOS,
            "sigs": app("grep -E '^Sig(Blk|Ign)' /proc/self/status; sleep 3600"),
        },
    )
    device = sandbox(rev, "--max-boots", "2")
    device.wait_goals()
    log = device.storage / "logs" / "sigs.log"
    device.wait_for(
        "the app's signal report", lambda _: "SigIgn" in (log.read_text() if log.exists() else "")
    )
    masks = dict(line.split(":") for line in log.read_text().splitlines() if line.startswith("Sig"))
    assert int(masks["SigBlk"], 16) == 0
    # (the shell itself ignores nothing here; crun sets no handlers)
    assert int(masks["SigIgn"], 16) == 0
    # SIGTERM to PID 1 means reboot: the launcher boots a second time
    os.kill(device.pid1(), signal.SIGTERM)
    device.wait_for(
        "the second boot",
        lambda s: s["uptime"] < 5 and sum(e.get("event") == "boot" for e in device.events()) == 2,
        timeout=60,
    )
    device.wait_goals()
    # SIGUSR1 means halt: the sandbox ends (it was the last allowed boot anyway)
    os.kill(device.pid1(), signal.SIGUSR1)
    assert device.proc is not None
    assert device.proc.wait(60) == 0
    events = device.events()
    assert any(e.get("event") == "goodbye" and e.get("action") == "reboot" for e in events)
    assert any(e.get("event") == "goodbye" and e.get("action") == "halt" for e in events)
