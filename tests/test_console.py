"""Each container's own /dev/console (systemd.io/CONTAINER_INTERFACE): a pty PID 1 reads
into the container's log. The pty itself (``managed.Console``) without a device, then
real sandbox devices under real crun."""

from __future__ import annotations

import os
import select
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from pvpy.device.logsink import LogSink
from pvpy.device.managed import Console
from tests.device import BUSYBOX_TREE, IDLE, app, build_revision


def open_as_container(console: Console) -> int:
    """The slave, opened by path as a container opens its /dev/console."""
    return os.open(console.path, os.O_WRONLY | os.O_NOCTTY)


def test_output_reaches_the_log_as_written(tmp_path: Path) -> None:
    console = Console(os.getuid(), os.getgid())
    sink = LogSink(tmp_path / "c.log")
    try:
        fd = open_as_container(console)
        os.write(fd, b"one\ntwo\n")
        console.read_into(sink)
        # an init that resets its console (systemd does) turns "\n" into "\r\n" again
        attrs = termios.tcgetattr(fd)
        attrs[1] |= termios.OPOST | termios.ONLCR
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        os.write(fd, b"three\n")
        console.read_into(sink)
        assert termios.tcgetattr(fd)[1] & termios.OPOST == 0  # turned off again
        os.write(fd, b"four\n")
        console.read_into(sink)
        os.close(fd)
    finally:
        console.close()
        sink.close()
    assert (tmp_path / "c.log").read_bytes() == b"one\ntwo\nthree\nfour\n"


def test_a_container_closing_its_console_wakes_nobody(tmp_path: Path) -> None:
    """Without PID 1's own slave fd, the master reads EIO, readable at once, forever."""
    console = Console(os.getuid(), os.getgid())
    sink = LogSink(tmp_path / "c.log")
    try:
        for n in range(3):  # writes, closes, reopens: as `echo x > /dev/console` does
            fd = open_as_container(console)
            os.write(fd, b"line %d\n" % n)
            os.close(fd)
            assert select.select([console.master], [], [], 1)[0] == [console.master]
            console.read_into(sink)
        assert select.select([console.master], [], [], 0.2)[0] == []
        console.read_into(sink)  # nothing to read: no error, nothing written
    finally:
        console.close()
        sink.close()
    assert (tmp_path / "c.log").read_bytes() == b"line 0\nline 1\nline 2\n"


def test_a_closed_console_fails_the_writer_instead_of_blocking_it() -> None:
    console = Console(os.getuid(), os.getgid())
    fd = open_as_container(console)
    console.close()
    with pytest.raises(OSError) as e:
        for _ in range(1000):  # more than a pty's buffer: a live one would block
            os.write(fd, b"x" * 1024)
    os.close(fd)
    assert e.value.errno == 5  # EIO


# ---- real devices -----------------------------------------------------------------------

needs_root = pytest.mark.root

# Reopens /dev/console for every line, holds it open once, exits 3 (its restart policy
# starts it again on the same console), then idles.
CLOSER = (
    'if [ -e /etc/ran-once ]; then echo "second run" > /dev/console; ' + IDLE + "; fi\n"
    """
touch /etc/ran-once
i=0; while [ $i -lt 20 ]; do echo "line $i" > /dev/console; i=$((i+1)); done
exec 3>/dev/console; echo held >&3; exec 3>&-
exit 3
"""
)
FLOODER = "timeout 3 yes flood > /dev/console; echo 'flood done' > /dev/console; " + IDLE


def wait_for_text(path: Path, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"{path.name} never said {text!r}:\n{content[-2000:]}"
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_root
def test_pid1_survives_a_console_closed_reopened_flooded_and_left(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {
        "closer": app(CLOSER, restart={"policy": "on-failure", "backoff_initial_ms": "100ms"}),
        "flooder": app(FLOODER),
        "quiet": app("echo hello > /dev/console; " + IDLE),
    })  # fmt: skip
    device = sandbox(rev)
    logs = device.storage / "logs"
    device.wait_for("booted", lambda status: status["revision"] == 1)
    answered = 0
    while "flood done" not in ((logs / "flooder.log").read_text(errors="replace")
                               if (logs / "flooder.log").exists() else ""):  # fmt: skip
        assert device.status()["revision"] == 1  # PID 1 answers while it copies the flood
        answered += 1
        time.sleep(0.2)
        assert answered < 150, device.tail()
    device.wait_goals()
    closer = wait_for_text(logs / "closer.log", "second run")
    assert "".join(f"line {i}\n" for i in range(20)) + "held\n" in closer
    assert device.container("closer")["restarts"] == 1
    assert "hello\n" in (logs / "quiet.log").read_text()
    # the flood went through the log's cap and its one rotation, nothing more
    assert (logs / "flooder.log.1").stat().st_size <= 1 << 20
    assert (logs / "flooder.log").stat().st_size <= 1 << 20
    # idle again: a console PID 1 spun on would cost it a core
    pid1 = device.pid1()
    before = cpu_seconds(pid1)
    time.sleep(2)
    assert cpu_seconds(pid1) - before < 0.5
    assert device.stop() == 0


@needs_root
def test_the_host_os_console_is_its_own_not_the_devices(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    show = "echo 'to the console' > /dev/console; echo major=$(stat -c %t /dev/console); "
    rev = build_revision(tmp_path, signing_dir, 1, {
        "hostos": {"role": "host-os", "rootfs": {"dir": str(BUSYBOX_TREE), "all_root": True},
                   "args": ["/bin/sh", "-c", show + IDLE]},
        "app": app(show + IDLE, user={"uid": 1000, "gid": 1000}),  # its user may open it
    })  # fmt: skip
    device = sandbox(rev)
    device.wait_goals()
    for name in ("hostos", "app"):
        log = wait_for_text(device.storage / "logs" / f"{name}.log", "major=")
        assert "to the console\n" in log, log
        assert "major=88" in log, log  # a pty (136), not the device's console (5:1)
    assert device.stop() == 0
