"""Hardening of PID 1 against its own storage (#13), on real sandbox devices.

GC and the writable layers of running containers, the boot fallback after a
corrupt committed revision, two devices on one storage, a bad fd handed to
PID 1's loop, and the size of PID 1's status reply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.device import COMMIT, HOSTOS, IDLE, app, build_revision, pvpy, variant

pytestmark = pytest.mark.root

# An app that writes a file into its writable layer once, then says every 0.3 s
# whether the file is still there (a layer pulled from under it says LOST).
KEEPER = (
    "trap 'exit 0' TERM; [ -f /kept ] || echo mine > /kept; "
    "while :; do if [ -f /kept ]; then echo HAVE; else echo LOST; fi; sleep 0.3 & wait $!; done"
)


def _pid(status: dict[str, Any], name: str) -> int:
    return int(next(c["pid"] for c in status["containers"] if c["name"] == name))


def test_gc_keeps_the_trail_whose_writable_layer_a_running_container_uses(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    # (the host OS, unchanged too, would keep revision 1's trail in use for its own
    # writable layer: it gets a layer per boot, so that keeper alone holds the trail)
    base = {"hostos": {**HOSTOS, "writable": "boot"}, "keeper": app(KEEPER)}
    revs = [
        build_revision(tmp_path, signing_dir, n, {**base, "web": variant(tmp_path, f"w{n}", IDLE)})
        for n in (1, 2, 3)
    ]
    device = sandbox(revs[0], *COMMIT)
    keeper = _pid(device.wait_goals(), "keeper")
    layer = device.storage / "trails" / "1" / "disks" / "keeper" / "upper" / "kept"
    assert layer.read_text() == "mine\n"

    # two app-only updates: only web restarts, keeper runs on with revision 1's layer
    for n in (2, 3):
        result = pvpy("device", "update", revs[n - 1], "--storage", device.storage, timeout=90)
        assert "UPDATED" in result.stdout
        now = device.wait_for(f"revision {n}", lambda s, n=n: s["committed"] == n)
        assert _pid(now, "keeper") == keeper
    # the commit of 3 collected garbage: it keeps 3 and the good one before (2), and
    # revision 1 too, whose trail holds keeper's writable layer
    assert (device.storage / "trails" / "1").is_dir()
    assert layer.read_text() == "mine\n"
    time.sleep(1)  # keeper looks at its file a few more times
    log = (device.storage / "logs" / "keeper.log").read_text()
    assert "HAVE" in log and "LOST" not in log

    # restarted, keeper starts in revision 3 with revision 3's (fresh) layer, and
    # revision 1's trail is collected since no running container uses it any more
    assert device.request({"cmd": "restart", "container": "keeper"})["ok"]
    device.wait_for(
        "keeper restarted", lambda s: _pid(s, "keeper") not in (keeper, None) and s["all_goals_met"]
    )
    fresh = device.storage / "trails" / "3" / "disks" / "keeper" / "upper" / "kept"
    deadline = time.monotonic() + 10  # (the new keeper writes it just after it started)
    while not fresh.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fresh.read_text() == "mine\n"
    deadline = time.monotonic() + 10
    while (device.storage / "trails" / "1").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (device.storage / "trails" / "1").exists()
    assert device.status()["revision"] == 3


def _corrupt(path: Path) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_boot_falls_back_to_a_good_revision_never_to_a_failed_newer_one(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    from pvpy.state import parse_unverified

    base = {"hostos": HOSTOS}
    crash = variant(tmp_path, "crash", "exit 1",
                    restart={"policy": "always", "backoff_initial_ms": "100ms"})  # fmt: skip
    revs = {
        1: build_revision(tmp_path, signing_dir, 1, {**base, "web": variant(tmp_path, "w1", IDLE)}),
        2: build_revision(tmp_path, signing_dir, 2, {**base, "web": variant(tmp_path, "w2", IDLE)}),
        3: build_revision(tmp_path, signing_dir, 3, {**base, "web": crash}),
    }
    device = sandbox(revs[1], *COMMIT)
    device.wait_goals()
    assert "UPDATED" in pvpy("device", "update", revs[2], "--storage", device.storage).stdout
    failed = pvpy("device", "update", revs[3], "--storage", device.storage, check=False)
    assert failed.returncode == 3 and "ERROR" in failed.stdout
    status = device.wait_for("back on 2", lambda s: s["updating"] is None and s["all_goals_met"])
    assert status["revision"] == 2 and status["committed"] == 2
    assert (device.storage / "trails" / "3").is_dir()  # failed: still installed, never good
    assert device.stop() == 0

    # the committed revision's own image goes bad: 3 is newer and verifies, but failed
    state = (device.storage / "trails" / "2" / "state.json").read_bytes()
    _corrupt(device.storage / "objects" / parse_unverified(state).container("web").rootfs.sha256)
    device.start(*COMMIT)
    booted = device.wait_for("a revision booted", lambda s: s["revision"] is not None)
    assert booted["revision"] == 1
    assert "revision 2" in booted["boot_error"]
    assert booted["committed"] == 2
    states = {u["revision"]: u["status"] for u in device.wait_goals()["updates"]}
    assert states[3] == "ERROR"


def test_a_second_device_on_the_same_storage_is_refused_and_touches_nothing(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "app": app(IDLE)})
    first = sandbox(rev)
    before = first.wait_goals()
    assert first.proc is not None
    second = subprocess.run(
        [sys.executable, "-m", "pvpy", "device", "run", "--storage", str(first.storage)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 10, second.stderr
    message = second.stderr.strip().splitlines()
    assert len(message) == 1 and f"pid {first.proc.pid}" in message[0], second.stderr
    # the first device still answers, on the same socket, with the same containers
    assert (first.run_dir / "control.sock").exists()
    after = first.status()
    assert [c["pid"] for c in after["containers"]] == [c["pid"] for c in before["containers"]]
    status = pvpy("device", "status", "--storage", first.storage)
    assert status.returncode == 0
    assert first.stop() == 0


def test_an_fd_the_selector_refuses_is_dropped_and_pid1_serves_on(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "app": app(IDLE)})
    device = sandbox(rev)
    before = device.wait_goals()
    # a container's notify fd becomes a regular file: epoll_ctl says EPERM
    assert device.request({"cmd": "inject", "fault": "bad-fd"})["ok"]
    for _ in range(10):
        time.sleep(0.2)
        after = device.status()  # the control socket answers on every pass
        assert after["all_goals_met"] and after["pending"] is None
        assert [c["pid"] for c in after["containers"]] == [c["pid"] for c in before["containers"]]
    events = [e.get("event") for e in device.events()]
    assert events.count("fd refused by the selector; dropped") == 1
    assert events.count("container fd dropped") == 1
    assert "loop iteration failed; going on" not in events
    assert device.stop() == 0


def test_status_stays_small_and_fast_with_thousands_of_update_records(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS})
    device = sandbox(rev)
    device.wait_goals()
    progress = device.storage / "progress"
    progress.mkdir(exist_ok=True)
    for n in range(100, 5100):  # every refused offer leaves one
        record = {"revision": n, "status": "WONTGO", "reason": "refused " + "x" * 100,
                  "percent": None, "kind": None, "time": 0.0}  # fmt: skip
        (progress / f"{n}.json").write_text(json.dumps(record))
    started = time.monotonic()
    for _ in range(10):
        status = device.status()
    took = time.monotonic() - started
    assert status["updates_total"] == 5000
    assert [u["revision"] for u in status["updates"]] == list(range(5068, 5100))
    assert len(json.dumps(status)) < 16 * 1024
    assert took < 3.0, f"10 status requests took {took:.1f}s"
    shown = pvpy("device", "status", "--storage", device.storage)
    assert "5099" in shown.stdout and "5067" not in shown.stdout


def test_a_boot_after_a_power_cut_starts_with_an_empty_run_dir(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "app": app(IDLE)})
    device = sandbox(rev)
    device.wait_goals()
    assert device.proc is not None
    device.proc.kill()  # a power cut: the launcher dies, its run dir on the host stays
    device.proc.wait(10)
    time.sleep(0.5)  # the kernel takes the pid namespace down
    assert (device.run_dir / "crun" / "hostos").exists()  # crun's state of the dead hostos
    device.start()
    status = device.wait_goals()
    assert status["boot_error"] is None
    assert not any("already exists" in (c["reason"] or "") for c in status["containers"])
    assert device.stop() == 0
