"""`pvpy init` in device mode (as on a board) does its early mounts itself.

It runs as PID 1 of a new pid + mount namespace, chrooted into a bare bind
of the host's root filesystem: /proc, /sys, /dev and /run are empty dirs
there, as on a board before init. Everything dies with the namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvpy import control
from pvpy.errors import DeviceError
from pvpy.signing import generate_key, sign_state
from pvpy.state import canonical

pytestmark = pytest.mark.root

SCRIPT = """
set -e
mount --bind / "$ROOT"
exec chroot "$ROOT" "$PYTHON" -m pvpy init --storage "$STORAGE" --log-level info
"""


def mounts_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        out[fields[4]] = fields[fields.index("-") + 1]
    return out


def test_device_mode_early_mounts_and_poweroff(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces and mounts")
    # an empty factory revision, provisioned as a board's storage would be
    keys = tmp_path / "keys"
    key = generate_key(keys)
    rev = tmp_path / "rev"
    rev.mkdir()
    data = canonical.encode({"#spec": "pvpy-state@1", "revision": 1, "containers": {}})
    (rev / "state.json").write_bytes(data)
    (rev / "state.sig.json").write_bytes(sign_state(data, [key]))
    storage = tmp_path / "storage"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pvpy",
            "device",
            "provision",
            "--storage",
            str(storage),
            "--state",
            str(rev),
            "--trust",
            str(keys / "pvpy.pub"),
        ],
        check=True,
        capture_output=True,
    )
    root = tmp_path / "root"
    root.mkdir()
    log = open(tmp_path / "init.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
            "--uts",
            "--ipc",
            "sh",
            "-c",
            SCRIPT,
        ],
        env={**os.environ, "ROOT": str(root), "PYTHON": sys.executable, "STORAGE": str(storage)},
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        pid1 = _wait_for_child(proc.pid)
        sock = Path(f"/proc/{pid1}/root/run/pvpy/control.sock")
        status = _status(sock)
        assert status["pid"] == 1 and status["revision"] == 1
        mounts = mounts_of(pid1)
        expected = {
            "/proc": "proc",
            "/sys": "sysfs",
            "/dev": "devtmpfs",
            "/dev/pts": "devpts",
            "/dev/shm": "tmpfs",
            "/run": "tmpfs",
        }
        for target, fstype in expected.items():
            assert mounts.get(target) == fstype, (target, mounts)
        assert mounts.get("/sys/fs/cgroup") in ("cgroup2", "tmpfs"), mounts
        os.kill(pid1, signal.SIGUSR2)  # power off, in order
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "init.log").read_text()
    assert '"goodbye"' in text and '"action": "poweroff"' in text


def _wait_for_child(parent: int) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            if Path(f"/proc/{child}/cmdline").read_bytes().find(b"pvpy\0init") >= 0:
                return int(child)
        time.sleep(0.05)
    raise AssertionError("PID 1 did not start")


def _status(sock: Path) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while True:
        try:
            status = control.request(sock, {"cmd": "status"}, timeout=5)
            if status.get("revision") is not None:  # booted (verification is async)
                return status
        except DeviceError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("PID 1 did not boot its revision")
        time.sleep(0.1)
