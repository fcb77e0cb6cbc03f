"""Hostile apps, booted for real (issue #13): what an app container cannot do by default.

Each test boots a sandbox device (real PID 1, real crun) whose apps probe their
own limits and print what they found to their log: raw sockets (CAP_NET_RAW),
mknod, devices outside the cgroup allow-list, a syscall the default seccomp
profile denies, new privileges in readiness checks. The same probes run in an
app that asks for more in its manifest, so each denial is shown to come from
the mechanism named and from nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.device import BUSYBOX_TREE, HOSTOS, IDLE, SandboxDevice, app, build_revision

pytestmark = pytest.mark.root

# Podman's default set (containers.conf default_capabilities), as CapEff bits.
PODMAN_CAPABILITY_MASK = sum(
    1 << bit
    for bit in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31)
    # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE
    # SYS_CHROOT SETFCAP
)

# vmsplice(2) on a bad fd: EBADF (9) when the kernel runs it, EPERM (1) when the
# default seccomp profile denies it. It needs no capability, so the two differ only
# by the seccomp filter.
VMSPLICE_C = r"""
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    long r = syscall(SYS_vmsplice, -1, 0, 0, 0);
    printf("vmsplice=%d\n", r < 0 ? errno : 0);
    return 0;
}
"""


def try_open(key: str, path: str) -> str:
    """Shell that prints key=ok, or key=<the error> (EPERM: "Operation not permitted").
    A failed redirection on a special builtin ends the shell: hence the subshell."""
    return f'err=$( (: < {path}) 2>&1 ) && echo {key}=ok || echo "{key}=${{err##*: }}"; '


# Nodes whose open(2) needs no capability: /dev/net/tun (c 10:200) and loop0 (b 7:0).
PROBES = (
    "rm -f /tun /loop; "
    "ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 && echo raw=ok || echo raw=denied; "
    # the nodes go into the writable layer: /tmp is a nodev tmpfs, where no node opens
    "mknod /tun c 10 200 2>/dev/null && echo mknod_tun=ok || echo mknod_tun=denied; "
    "mknod /loop b 7 0 2>/dev/null && echo mknod_loop=ok || echo mknod_loop=denied; "
    + try_open("open_tun", "/tun")
    + try_open("open_loop", "/loop")
    + "grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/self/status | tr -d '\\t' | tr : =; "
    "/usr/bin/vmsplice; echo probes=done; "
)


@pytest.fixture(scope="module")
def probe_tree(tmp_path_factory: pytest.TempPathFactory, demo_trees: Path) -> Path:
    """The busybox tree of the demo apps plus a static vmsplice probe."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed: the seccomp probe is a small static C program")
    tree = tmp_path_factory.mktemp("probe") / "tree"
    shutil.copytree(BUSYBOX_TREE, tree, symlinks=True)
    source = tree.parent / "vmsplice.c"
    source.write_text(VMSPLICE_C)
    result = subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(tree / "usr/bin/vmsplice"), str(source)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot link a static program here: {result.stderr.strip()[-200:]}")
    return tree


def probe_app(tree: Path, script: str, **extra: Any) -> dict[str, Any]:
    return {**app(script + IDLE, **extra), "rootfs": {"dir": str(tree), "all_root": True}}


def findings(device: SandboxDevice, name: str, timeout: float = 20) -> dict[str, str]:
    """key=value lines an app printed up to its 'probes=done'."""
    log = device.storage / "logs" / f"{name}.log"
    deadline = time.monotonic() + timeout
    while "probes=done" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"{name} never finished its probes\n{device.tail()}"
        time.sleep(0.1)
    pairs = (line.split("=", 1) for line in log.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def test_an_app_gets_podmans_capabilities_seccomp_and_device_allow_list(
    tmp_path: Path, sandbox: Any, signing_dir: Path, probe_tree: Path
) -> None:
    """By default: no raw socket, no mknod, seccomp filter on. An app that asks for
    CAP_NET_RAW and CAP_MKNOD gets them, yet opens only the devices on its allow-list
    (the defaults and its manifest's ``devices``). ``seccomp: unconfined`` turns the
    filter off: the same syscall then reaches the kernel."""
    tun = "/dev/net/tun"
    if not Path(tun).exists():
        pytest.skip(f"{tun} missing on this host: the device allow-list probe opens it")
    extra_caps = [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
        "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
        "CAP_SYS_CHROOT", "CAP_NET_RAW", "CAP_MKNOD",
    ]  # fmt: skip
    # /dev/fuse is granted; the host's tun node is bind-mounted but not granted
    opens = try_open("open_granted", "/dev/fuse") + try_open("open_host_node", "/mnt/tun")
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "plain": probe_app(probe_tree, PROBES),
            "more": probe_app(
                probe_tree,
                opens + PROBES,
                capabilities=extra_caps,
                devices=[{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
                mounts=[{"type": "bind", "source": tun, "target": "/mnt/tun"}],
                privileges={"host_mounts": True},
            ),
            "open": probe_app(probe_tree, PROBES, seccomp="unconfined"),
        },
    )
    device = sandbox(rev)
    device.wait_goals()

    plain = findings(device, "plain")
    assert plain["raw"] == "denied", plain  # no CAP_NET_RAW: cannot sniff the host's LAN
    assert plain["mknod_tun"] == "denied" and plain["mknod_loop"] == "denied", plain
    assert int(plain["CapEff"], 16) == PODMAN_CAPABILITY_MASK, plain
    assert plain["Seccomp"] == "2" and plain["NoNewPrivs"] == "1", plain
    assert plain["vmsplice"] == "1", plain  # EPERM: the filter, not a capability

    more = findings(device, "more")
    assert more["raw"] == "ok", more
    # with CAP_MKNOD a node can be made (crun allows mknod of any node, as runc does),
    # but the devices cgroup lets it be opened only if it is on the allow-list
    assert more["mknod_tun"] == "ok" and more["mknod_loop"] == "ok", more
    assert more["open_tun"] == "Operation not permitted", more
    assert more["open_loop"] == "Operation not permitted", more
    assert more["open_host_node"] == "Operation not permitted", more
    assert more["open_granted"] == "ok", more

    unconfined = findings(device, "open")
    assert unconfined["Seccomp"] == "0", unconfined
    assert unconfined["vmsplice"] == "9", unconfined  # EBADF: the kernel ran it
    device.stop()


def test_readiness_check_runs_with_no_new_privileges(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    """A readiness command (crun exec) gets no_new_privs like the app itself: it is
    READY only if the check sees NoNewPrivs: 1."""
    check = ["sh", "-c", "grep -q '^NoNewPrivs:[[:space:]]*1' /proc/self/status"]
    rev = build_revision(
        tmp_path,
        signing_dir,
        1,
        {
            "checked": app(
                IDLE,
                status_goal="READY",
                readiness={"type": "command", "command": check, "interval_ms": 200},
            )
        },
    )
    device = sandbox(rev)
    device.wait_for(
        "the readiness check to see no_new_privs",
        lambda s: any(c["name"] == "checked" and c["status"] == "READY" for c in s["containers"]),
        timeout=20,
    )
    device.stop()


def test_a_power_cut_leaves_no_container_that_blocks_the_next_boot(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    """SIGKILL of the sandbox (a power cut: the whole namespace dies, crun's state
    under the run dir stays behind) and boot again: every container comes back."""
    rev = build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS, "idle": app(IDLE)})
    device = sandbox(rev)
    device.wait_goals()
    first = {c["name"]: c["pid"] for c in device.status()["containers"]}
    assert device.proc is not None
    device.proc.kill()  # the launcher and, with it, the whole sandbox: nothing cleans up
    device.proc.wait(10)
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", f"--storage {device.storage} "]).returncode == 0:
        assert time.monotonic() < deadline, "the sandbox outlived its launcher"
        time.sleep(0.1)
    assert os.path.isdir(device.run_dir / "crun" / "hostos"), "crun's state did not survive"
    device.start()
    status = device.wait_goals()
    assert {c["name"] for c in status["containers"]} == set(first)
    assert all(c["status"] == "STARTED" for c in status["containers"]), status
    device.stop()
