"""Distributions' inits as containers: systemd's container interface
(systemd.io/CONTAINER_INTERFACE), real-time stop signals, and a host OS that rearranges
its cgroups without harming PID 1 or the apps. Real sandbox devices, real crun."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.device import BUSYBOX_TREE, COMMIT, IDLE, app, build_revision, pvpy

pytestmark = pytest.mark.root

# busybox sh knows real-time signals by number only: 37 is glibc's SIGRTMIN+3
RTMIN3_ONLY = "trap 'echo halting; exit 0' 37; while :; do sleep 1 & wait $!; done"


def wait_for_text(path: Path, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"{path.name} never said {text!r}:\n{content}"
        time.sleep(0.1)


def busybox_host_os(script: str) -> dict[str, Any]:
    return {
        "role": "host-os",
        "rootfs": {"dir": str(BUSYBOX_TREE), "all_root": True},
        "args": ["/bin/sh", "-c", script],
    }


def test_an_init_that_halts_on_rtmin_3_stops_in_order(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    """systemd ignores SIGTERM as a request to stop (it re-executes) and halts on
    SIGRTMIN+3: with ``stop_signal: RTMIN+3`` it stops well before its stop timeout."""
    rev = build_revision(tmp_path, signing_dir, 1, {
        "hostos": busybox_host_os(RTMIN3_ONLY) | {"stop_signal": "RTMIN+3",
                                                  "stop_timeout_ms": "60s"},
        "app": app(RTMIN3_ONLY, stop_signal="RTMIN+3", stop_timeout_ms="60s"),
    })  # fmt: skip
    device = sandbox(rev)
    device.wait_goals()
    started = time.monotonic()
    assert device.stop() == 0
    assert time.monotonic() - started < 20
    events = device.events()
    assert not [e for e in events if e.get("event") == "stop timed out, killing"]
    stopped = [e["name"] for e in events if e.get("event") == "container"
               and e.get("status") == "STOPPED"]  # fmt: skip
    assert stopped == ["app", "hostos"]
    for name in ("app", "hostos"):
        assert "halting" in (device.storage / "logs" / f"{name}.log").read_text()


def test_every_container_is_told_it_runs_in_a_container(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    show = 'echo "env=$container file=$(cat /run/systemd/container)"; ' + IDLE
    rev = build_revision(tmp_path, signing_dir, 1, {
        "hostos": busybox_host_os(show),
        "app": app(show, env={"container": "docker"}),  # ours wins: we run it
    })  # fmt: skip
    device = sandbox(rev)
    device.wait_goals()
    for name in ("hostos", "app"):
        log = wait_for_text(device.storage / "logs" / f"{name}.log", "env=")
        assert "env=pvpy file=pvpy" in log, log


# What systemd does to the /sys/fs/cgroup it is given, and worse: sub-groups in every
# hierarchy, a hierarchy of its own, the tmpfs remounted read-only.
REARRANGE = """
for h in /sys/fs/cgroup/*; do mkdir -p "$h/$SCOPE" && echo "made $h/$SCOPE"; done
mkdir -p /sys/fs/cgroup/extra && mount -t tmpfs tmpfs /sys/fs/cgroup/extra
mount -o remount,ro /sys/fs/cgroup && echo remounted
grep ' /sys/fs/cgroup' /proc/self/mountinfo
echo rearranged
"""


def test_a_host_os_rearranging_its_cgroups_harms_no_app(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    scope = f"made-by-{tmp_path.name}"  # unique: the host may have an init.scope
    rev = build_revision(tmp_path, signing_dir, 1, {
        "hostos": busybox_host_os(REARRANGE + IDLE) | {"env": {"SCOPE": scope}},
        "app": app("echo up; " + IDLE),
    })  # fmt: skip
    device = sandbox(rev)
    try:
        rearranged_harmlessly(device, scope)
    finally:  # without a cgroup namespace they land in the hierarchies' roots
        for made in Path("/sys/fs/cgroup").glob(f"*/{scope}"):
            made.rmdir()


def rearranged_harmlessly(device: Any, scope: str) -> None:
    device.wait_goals()
    host_log = wait_for_text(device.storage / "logs" / "hostos.log", "rearranged")
    assert "made" in host_log and "remounted" in host_log, host_log
    # the host OS's cgroup root is its own cgroup: what it made is below pvpy-<dev>/hostos
    parent = f"pvpy-{device.run_dir.name}"
    assert Path(f"/sys/fs/cgroup/memory/{parent}/hostos/{scope}").is_dir()
    assert not Path(f"/sys/fs/cgroup/memory/{scope}").exists()
    # an app restarted afterwards gets its cgroups as before
    app_pid = device.container("app")["pid"]
    assert device.request({"cmd": "restart", "container": "app"})["ok"]
    device.wait_for(
        "app restarted",
        lambda s: any(
            c["name"] == "app" and c["status"] == "STARTED" and c["pid"] != app_pid
            for c in s["containers"]
        ),
    )
    assert wait_for_text(device.storage / "logs" / "app.log", "up\nup")
    assert device.container("app")["restarts"] == 1  # a restart asked for counts too
    assert device.stop() == 0


# An app's look at its cgroups. The writable place: the name=systemd hierarchy on v1
# (the controllers are read-only), /sys/fs/cgroup itself on cgroup2 with nsdelegate.
APP_CGROUPS = """
W=/sys/fs/cgroup; [ -d $W/systemd ] && W=$W/systemd
LIMIT=/sys/fs/cgroup/memory.max; [ -d /sys/fs/cgroup/memory ] && LIMIT=/sys/fs/cgroup/memory/memory.limit_in_bytes
echo "limit=$(cat $LIMIT)"
echo 999999999 > $LIMIT && echo "limit raised"
mkdir $W/child && echo $$ > $W/child/cgroup.procs && echo "moved to child"
echo "groups=$(cut -d: -f3 /proc/self/cgroup | sort -u | tr '\n' ' ')"
echo "seen=$(ls $W | tr '\n' ' ')"
"""


def cgroup_mounts_of(pid: int) -> list[str]:
    """PID 1's cgroup mounts: mount point, file system, options, root."""
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4].startswith("/sys/fs/cgroup"):
            sep = fields.index("-")
            out.append(" ".join([fields[4], fields[3], fields[5], *fields[sep + 1 : sep + 4]]))
    return sorted(out)


def test_an_app_sees_its_own_cgroup_and_may_make_groups_not_lift_its_limits(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {
        "app": app(APP_CGROUPS + "echo looked; " + IDLE, cgroup={"memory_max": "64M"}),
        "other": app(IDLE),
    })  # fmt: skip
    device = sandbox(rev)
    device.wait_goals()
    log = wait_for_text(device.storage / "logs" / "app.log", "looked")
    assert f"limit={64 << 20}\n" in log, log  # its own group's limit: its root is its group
    assert "limit raised" not in log, log
    assert "moved to child" in log and "groups=/ /child " in log, log
    assert "child" in log.split("seen=")[1] and "other" not in log.split("seen=")[1], log
    # seen from PID 1: the child is below the app's own group
    parent = f"pvpy-{device.run_dir.name}"
    writable = Path("/sys/fs/cgroup/systemd")
    writable = writable if writable.is_dir() else Path("/sys/fs/cgroup")
    assert (writable / parent / "app" / "child").is_dir()
    assert device.stop() == 0


# An app allowed to mount (CAP_SYS_ADMIN) rearranges its cgroup mount as systemd would.
REARRANGE_APP = """
W=/sys/fs/cgroup; [ -d $W/systemd ] && W=$W/systemd
mkdir $W/init.scope && echo $$ > $W/init.scope/cgroup.procs && echo "moved"
mkdir -p /sys/fs/cgroup/extra && mount -t tmpfs tmpfs /sys/fs/cgroup/extra && echo "mounted"
mount -o remount,ro /sys/fs/cgroup && echo remounted
echo rearranged
"""


def test_apps_start_restart_and_update_after_an_app_rearranged_its_cgroups(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    arranger = app(REARRANGE_APP + IDLE, capabilities=["CAP_SYS_ADMIN"])
    plain = app("echo up; " + IDLE)
    rev1 = build_revision(tmp_path, signing_dir, 1, {"arranger": arranger, "app": plain})
    rev2 = build_revision(tmp_path, signing_dir, 2, {
        "arranger": arranger, "app": plain, "newapp": app("echo new up; " + IDLE),
    })  # fmt: skip
    device = sandbox(rev1, *COMMIT)
    device.wait_goals()
    before = cgroup_mounts_of(device.pid1())
    log = wait_for_text(device.storage / "logs" / "arranger.log", "rearranged")
    assert "moved" in log and "mounted" in log and "remounted" in log, log
    app_pid = device.container("app")["pid"]
    assert device.request({"cmd": "restart", "container": "app"})["ok"]
    device.wait_for("app restarted", lambda s: any(
        c["name"] == "app" and c["status"] == "STARTED" and c["pid"] != app_pid
        for c in s["containers"]
    ))  # fmt: skip
    assert wait_for_text(device.storage / "logs" / "app.log", "up\nup")
    assert device.container("app")["restarts"] == 1  # a restart asked for counts too
    assert "UPDATED" in pvpy("device", "update", rev2, "--storage", device.storage).stdout
    device.wait_goals()
    assert wait_for_text(device.storage / "logs" / "newapp.log", "new up")
    assert device.container("arranger")["restarts"] == 0  # untouched by the update
    assert cgroup_mounts_of(device.pid1()) == before
    assert device.stop() == 0
