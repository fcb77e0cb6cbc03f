"""A real distribution as the host OS: examples/debian's Debian bookworm with systemd.

The root filesystem is what ``examples/debian/make-rootfs`` builds (mmdebstrap, cached
in ~/.cache/pvpy/debian: ~25 s the first time, nothing after) and is packed once per
module; the apps are the demo's. In the sandbox: systemd reaches ``running`` with no
failed unit, apps start, restart and update around it, a new host OS try-boots and
commits, and power-off halts systemd in order (SIGRTMIN+3: its services stopped, then
it halts by itself, never SIGKILLed). systemd's own record of it is its journal, in the
host OS's writable layer on the storage: read as bytes (short messages are stored
plainly), so no journalctl is needed. On the QEMU arm64 board (``PVPY_SLOW=1``): the
same host OS, arm64, booted through U-Boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.device import COMMIT, DEMO, REPO, SandboxDevice, build_revision, pvpy, variant

# The first test also waits for make-rootfs (~25 s, once) and the packing of a ~200 MB
# tarball (~35 s; minutes when the machine is busy): more than pytest's default 300 s.
pytestmark = [pytest.mark.root, pytest.mark.timeout(1200)]

EXAMPLE = REPO / "examples" / "debian"
MIRROR = "http://deb.debian.org/debian/dists/bookworm/InRelease"
# The bug this guards against is systemd waiting 90 s for a console tty that never
# comes (no container= variable): "running" well before that, not a speed claim.
RUNNING_WITHIN = 45.0
WAIT_RUNNING = 180.0  # the sandbox's own boot on a busy machine comes on top
GOALS = 180.0  # the host OS is READY when systemd is running
# What systemd writes to its journal when it halts in order.
ORDERLY_HALT = (
    b"MESSAGE=Stopped dbus.service",
    b"MESSAGE=Stopped systemd-logind.service",
    b"MESSAGE=Reached target shutdown.target",
    b"MESSAGE=Shutting down.",
    b"MESSAGE=Journal stopped",
)


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def make_debian_rootfs(arch: str) -> Path:
    """examples/debian/make-rootfs ARCH -> the cached tarball; skips when the Debian
    mirror cannot be reached (and the tarball is not cached yet)."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (tools/setup installs it)")
    made = subprocess.run([EXAMPLE / "make-rootfs", arch], capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    if made.returncode != 0:
        try:
            urllib.request.urlopen(MIRROR, timeout=15).close()
        except OSError as e:
            pytest.skip(f"mmdebstrap cannot reach the Debian mirror ({MIRROR}: {e})")
        raise AssertionError(f"make-rootfs {arch} failed:\n{made.stderr}")
    return (EXAMPLE / "build" / f"debian-{arch}.tar").resolve()


@pytest.fixture(scope="module")
def debian_squashfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian host OS of this machine's architecture as a squashfs image, packed
    once (a ~200 MB tarball takes ~35 s): the specs below take it as it is."""
    from pvpy.store import ObjectStore
    from pvpy.workstation.pack import pack_rootfs
    from tests.device import need_root_tools

    need_root_tools()
    tarball = make_debian_rootfs(host_arch())
    work = tmp_path_factory.mktemp("debian")
    packed = pack_rootfs(tarball, ObjectStore(work / "objects"))
    image = work / "debian.squashfs"
    os.link(work / "objects" / packed.sha256, image)
    return image


def host_os(image: Path, **extra: Any) -> dict[str, Any]:
    """examples/debian/spec.yaml's host OS, from the packed image."""
    return {
        "role": "host-os",
        "rootfs": {"squashfs": str(image)},
        "args": ["/sbin/init"],
        "status_goal": "READY",
        "readiness": {
            "type": "command",
            "command": ["systemctl", "is-system-running", "--quiet"],
            "interval_ms": "1s",
        },
        "stop_signal": "RTMIN+3",
        "stop_timeout_ms": "60s",
        **extra,
    }


HELLO = {
    "rootfs": {"dir": str(DEMO / "build" / "hello"), "all_root": True},
    "args": ["/usr/bin/hello"],
    "volumes": [{"name": "data", "target": "/data", "persistence": "permanent"}],
    "restart": {"policy": "always", "backoff_initial_ms": "500ms"},
}


def in_host_os(device: SandboxDevice, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` run in the host OS container (crun exec, from PID 1's namespaces:
    crun's state names pids as the sandbox sees them)."""
    return subprocess.run(
        ["nsenter", "-t", str(device.pid1()), "-p", "-m", "--",
         "crun", "--root", str(device.run_dir / "crun"), "exec", "hostos", *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def system_state(device: SandboxDevice) -> str:
    """``systemctl is-system-running``: starting, running, degraded, ..."""
    return in_host_os(device, "systemctl", "is-system-running").stdout.strip()


def wait_running(device: SandboxDevice) -> float:
    """Wait until systemd says ``running``; return how long its startup took by its
    own clock (from its start to the end of its boot transaction)."""
    deadline = time.monotonic() + WAIT_RUNNING
    while (state := system_state(device)) != "running":
        assert state in ("", "initializing", "starting"), f"systemd is {state!r}{failed(device)}"
        assert time.monotonic() < deadline, f"systemd still {state!r}{failed(device)}"
        time.sleep(0.5)
    times = in_host_os(device, "systemctl", "show", "--property",
                       "UserspaceTimestampMonotonic,FinishTimestampMonotonic").stdout  # fmt: skip
    stamps = dict(line.split("=", 1) for line in times.split())
    startup = (int(stamps["FinishTimestampMonotonic"])
               - int(stamps["UserspaceTimestampMonotonic"])) / 1e6  # fmt: skip
    assert 0 < startup < RUNNING_WITHIN, f"systemd took {startup:.1f} s to start up"
    return startup


def failed(device: SandboxDevice) -> str:
    units = in_host_os(device, "systemctl", "--failed", "--plain", "--no-legend").stdout
    return f"; failed units:\n{units}" if units.strip() else ""


def assert_up_and_clean(device: SandboxDevice) -> None:
    assert in_host_os(device, "cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert system_state(device) == "running", failed(device)
    assert failed(device) == ""


def journal(device: SandboxDevice, revision: int) -> bytes:
    """The host OS's journal files in revision ``revision``'s writable layer."""
    upper = device.storage / "trails" / str(revision) / "disks" / "hostos" / "upper"
    files = sorted(upper.glob("var/log/journal/*/*.journal"))
    assert files, f"no journal under {upper}"
    return b"".join(f.read_bytes() for f in files)


def assert_halted_in_order(device: SandboxDevice, revision: int) -> None:
    """The host OS of ``revision`` stopped itself (systemd's halt ends in reboot(2),
    which the kernel turns into SIGINT for the init of a pid namespace: crun 130),
    never killed at the stop timeout, and its journal shows the orderly halt."""
    events = device.events()
    assert not [e for e in events if e.get("event") == "stop timed out, killing"]
    stops = [e.get("reason") for e in events if e.get("name") == "hostos"
             and e.get("event") == "container" and e.get("status") == "STOPPED"]  # fmt: skip
    assert stops and set(stops) <= {"exit 130", "exit 0"}, stops
    written = journal(device, revision)
    missing = [m.decode() for m in ORDERLY_HALT if m not in written]
    assert not missing, f"the journal lacks {missing}"


def hello_runs(device: SandboxDevice) -> list[str]:
    log = (device.storage / "logs" / "hello.log").read_text(errors="replace")
    return [line for line in log.splitlines() if line.startswith("hello: run ")]


def wait_hello_runs(device: SandboxDevice, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(hello_runs(device)) < count:
        assert time.monotonic() < deadline, f"hello ran {hello_runs(device)}"
        time.sleep(0.2)


@pytest.fixture
def device(
    tmp_path: Path, sandbox: Any, signing_dir: Path, debian_squashfs: Path
) -> Iterator[SandboxDevice]:
    """The Debian host OS and the demo's hello, booted, every goal met (systemd running)."""
    rev = build_revision(tmp_path, signing_dir, 1,
                         {"hostos": host_os(debian_squashfs), "hello": HELLO})  # fmt: skip
    device = sandbox(rev, *COMMIT)
    device.wait_goals(GOALS)
    yield device


def test_systemd_runs_in_seconds_and_apps_start_beside_it(
    device: SandboxDevice,
) -> None:
    wait_running(device)
    assert_up_and_clean(device)
    # an app started after systemd is up: its cgroups are PID 1's as before
    hello = device.container("hello")["pid"]
    assert device.request({"cmd": "restart", "container": "hello"})["ok"]
    device.wait_for("hello restarted", lambda s: any(
        c["name"] == "hello" and c["status"] == "STARTED" and c["pid"] != hello
        for c in s["containers"]))  # fmt: skip
    wait_hello_runs(device, 2)
    assert_up_and_clean(device)


def test_an_app_only_update_leaves_systemd_running(
    device: SandboxDevice, tmp_path: Path, signing_dir: Path,
    debian_squashfs: Path,
) -> None:  # fmt: skip
    wait_running(device)
    before = {c["name"]: c["pid"] for c in device.status()["containers"]}
    hello2 = {**variant(tmp_path, "hello2", ""), "args": ["/usr/bin/hello"],
              "volumes": HELLO["volumes"]}  # fmt: skip
    rev2 = build_revision(tmp_path, signing_dir, 2,
                          {"hostos": host_os(debian_squashfs), "hello": hello2})  # fmt: skip
    result = pvpy("device", "update", rev2, "--storage", device.storage, timeout=90)
    assert "UPDATED" in result.stdout, result.stdout
    after = device.wait_goals(GOALS)
    assert after["revision"] == 2 and after["committed"] == 2
    now = {c["name"]: c["pid"] for c in after["containers"]}
    assert now["hostos"] == before["hostos"] and now["hello"] != before["hello"]
    wait_hello_runs(device, 2)
    assert_up_and_clean(device)


def test_a_new_host_os_try_boots_and_commits(
    device: SandboxDevice, tmp_path: Path, signing_dir: Path,
    debian_squashfs: Path,
) -> None:  # fmt: skip
    wait_running(device)
    new_host_os = host_os(debian_squashfs, env={"PVPY_EXAMPLE": "revision 2"})
    rev2 = build_revision(tmp_path, signing_dir, 2, {"hostos": new_host_os, "hello": HELLO})
    result = pvpy("device", "update", rev2, "--storage", device.storage, timeout=180)
    assert "TESTING" in result.stdout and "DONE" in result.stdout, result.stdout
    done = device.wait_goals(GOALS)
    assert done["revision"] == 2 and done["committed"] == 2 and done["try"] is None
    assert_up_and_clean(device)
    env = in_host_os(device, "cat", "/proc/1/environ").stdout.split("\0")
    assert "PVPY_EXAMPLE=revision 2" in env
    # the old host OS went down in order for the reboot
    assert_halted_in_order(device, 1)


def test_power_off_halts_systemd_in_order(device: SandboxDevice) -> None:
    wait_running(device)
    assert device.stop() == 0
    assert_halted_in_order(device, 1)


def test_systemd_console_is_the_host_os_log(device: SandboxDevice) -> None:
    """The host OS's /dev/console is its own pty, read into logs/hostos.log: systemd's
    boot and halt are there (not on the device's console), with no unit [FAILED]."""
    wait_running(device)
    assert device.stop() == 0
    console = (device.storage / "logs" / "hostos.log").read_text(errors="replace")
    for line in ("Welcome to Debian GNU/Linux 12 (bookworm)!",
                 "Reached target multi-user.target", "Reached target shutdown.target",
                 "Halting system."):  # fmt: skip
        assert line in console, f"{line!r} not in hostos.log:\n{console[-3000:]}"
    assert "[FAILED]" not in console, console


def host_pids(device: SandboxDevice, container_pid: int) -> list[int]:
    """The host's pids of every process of the container PID 1's status gives
    ``container_pid``: PID 1's descendants in that container's pid namespace."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():  # "pid (comm) state ppid ...": comm may hold spaces
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    pid1 = device.pid1()

    def below_pid1(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == pid1:
                return True
        return False

    mine = [pid for pid in parents if below_pid1(pid)]
    # the pid in PID 1's status is crun's (`crun run` in the foreground): the
    # container's init is its child in a pid namespace of its own
    runtime = next(pid for pid in mine if nspids(pid)[1:2] == [container_pid])
    pid_ns = next(ns for pid in mine if parents[pid] == runtime
                  and (ns := pid_namespace(pid)) != pid_namespace(runtime))  # fmt: skip
    return [pid for pid in mine if pid_namespace(pid) == pid_ns]


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:  # gone meanwhile
        return None


def nspids(pid: int) -> list[int]:
    """The pid of ``pid`` in each pid namespace it is in, outermost first."""
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(n) for n in status.split("NSpid:")[1].splitlines()[0].split()]


MACHINE_CGROUP2 = Path("/sys/fs/cgroup/unified")  # a v1-hybrid machine's cgroup2


@pytest.mark.skipif(
    not (MACHINE_CGROUP2 / "cgroup.procs").exists(), reason="no v1-hybrid cgroup2 here"
)
def test_systemd_keeps_out_of_the_machines_cgroup2_root(
    device: SandboxDevice,
) -> None:
    """Every process of the host OS is in a cgroup2 group below this device's, or
    left at the root by a systemd that does not use cgroup2: none in a group systemd
    made at the root of the machine's hierarchy, where two devices would share it."""
    wait_running(device)
    own = f"/pvpy-{device.run_dir.name}/"
    for pid in host_pids(device, device.container("hostos")["pid"]):
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        cgroup2 = next(line for line in lines if line.startswith("0::"))[3:]
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        assert cgroup2 == "/" or cgroup2.startswith(own), f"{comm} ({pid}) in {cgroup2}"


# -- the QEMU arm64 board ----------------------------------------------------------------

SLOW = os.environ.get("PVPY_SLOW") == "1"
BOARD_BOOT_TIMEOUT = 1500.0  # TCG: U-Boot, the kernel, pvpy, then systemd emulated


@pytest.fixture(scope="module")
def debian_board_image(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """examples/debian/spec.yaml built for qemu-arm64: the arm64 Debian host OS (its
    first build takes minutes under qemu-user; cached after) and the demo's apps."""
    import yaml

    from pvpy.errors import PvpyError
    from pvpy.workstation.image import build_image
    from pvpy.workstation.qemu import ensure_qemu

    if not SLOW:
        pytest.skip("slow (an arm64 Debian under qemu-user, then booted under TCG): PVPY_SLOW=1")
    try:
        ensure_qemu()
    except PvpyError as e:
        pytest.skip(f"qemu-system-aarch64 cannot be installed: {e}")
    if shutil.which("arch-test") is None or not Path("/usr/bin/qemu-aarch64-static").exists():
        pytest.skip(
            "an arm64 rootfs needs qemu-user-static, binfmt-support and arch-test "
            "(PVPY_EXTRA_PKGS='qemu-user-static binfmt-support arch-test' tools/setup)"
        )
    tarball = make_debian_rootfs("arm64")
    work = tmp_path_factory.mktemp("debian-board")
    spec = yaml.safe_load((EXAMPLE / "spec.yaml").read_text())
    spec["containers"]["hostos"]["rootfs"] = {"tar": str(tarball)}
    for name in ("hello", "web"):  # built here: examples/demo/build may be rebuilt meanwhile
        tree = work / "build" / name
        subprocess.run([REPO / "rootfs" / "busybox-tree", tree, DEMO / "overlays" / name],
                       check=True)  # fmt: skip
        spec["containers"][name]["rootfs"]["dir"] = str(tree)
    (work / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return build_image("qemu-arm64", work / "img", spec=work / "spec.yaml")


def board_status(url: str, token: Path) -> Any:
    from tests import apiclient

    return apiclient.api_or_none(url, token, "/v1/status")


def board_wait(url: str, token: Path, machine: Any, what: str, ok: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    status = None
    while True:
        status = board_status(url, token)
        if status is not None and ok(status):
            return status
        assert machine.running(), f"qemu exited waiting for {what} ({machine.log_path})"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s: {status}"
        time.sleep(2)


def board_log(url: str, token: Path, name: str) -> str:
    from tests import apiclient

    conn, response = apiclient.device(url, token).open(
        "GET", f"/v1/logs/{name}?tail=10000", headers={"Accept": "text/plain"})  # fmt: skip
    try:
        return response.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.mark.qemu
@pytest.mark.timeout(2400)
def test_the_qemu_board_runs_the_debian_host_os(debian_board_image: Any, tmp_path: Path) -> None:
    """U-Boot -> Linux -> pvpy as PID 1 -> Debian's systemd as the host OS: READY (its
    readiness is ``systemctl is-system-running``: running, no unit failed), an app
    restarted while it runs, and power-off halting systemd by itself."""
    from pvpy.workstation.qemu import Machine
    from tests import apiclient
    from tests.device import free_port

    image = debian_board_image
    port = free_port()
    url, token = f"https://127.0.0.1:{port}", image.out / "api-token"

    def containers(status: Any) -> dict[str, Any]:
        return {c["name"]: c for c in status["containers"]}

    with Machine(image.out, port=port, log_path=tmp_path / "console.log") as machine:
        up = board_wait(url, token, machine, "all goals met",
                        lambda s: s["all_goals_met"], BOARD_BOOT_TIMEOUT)  # fmt: skip
        assert {n: c["status"] for n, c in containers(up).items()} == {
            "hostos": "READY", "hello": "STARTED", "web": "READY"}  # fmt: skip
        console = board_log(url, token, "hostos")
        assert "Welcome to Debian GNU/Linux 12 (bookworm)!" in console, console[-3000:]
        assert "[FAILED]" not in console, console

        hello, hostos = containers(up)["hello"]["pid"], containers(up)["hostos"]["pid"]
        apiclient.api(url, token, "/v1/containers/hello/restart", method="POST")
        again = board_wait(url, token, machine, "hello restarted", lambda s: (
            containers(s)["hello"]["pid"] not in (None, hello) and s["all_goals_met"]),
            120)  # fmt: skip
        assert containers(again)["hostos"]["pid"] == hostos
        assert containers(again)["hostos"]["status"] == "READY"  # still running, no failure
        assert "hello: run 2" in board_log(url, token, "hello")

        # an app-only update while systemd runs: hello restarts, the host OS stays up
        from tests.qemu_guest import derive_revision

        def hello_v2(doc: dict[str, Any], _objects: Any) -> None:
            doc["containers"]["hello"].setdefault("env", {})["PVPY_EXAMPLE_REV"] = "2"

        assert image.key is not None
        rev2 = derive_revision(image.revision_dir, tmp_path / "rev2", 2, image.key, hello_v2)
        push = subprocess.run(
            [sys.executable, "-m", "pvpy", "device", "push", url, str(rev2), "--token-file",
             str(token)], capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert push.returncode == 0 and "revision 2: UPDATED" in push.stdout, (
            push.stdout + push.stderr
        )
        updated = board_wait(url, token, machine, "revision 2", lambda s: (
            s["revision"] == 2 and s["all_goals_met"]), 300)  # fmt: skip
        assert containers(updated)["hostos"]["pid"] == hostos
        assert containers(updated)["hostos"]["status"] == "READY"

        mark = len(machine.lines)
        apiclient.api(url, token, "/v1/commands/poweroff", method="POST")
        machine.wait_for(r'"action": "poweroff", "event": "goodbye"', 120, mark)
        deadline = time.monotonic() + 60
        while machine.running():
            assert time.monotonic() < deadline, "qemu still running after the power off"
            time.sleep(0.5)
        assert machine.status == 0
        # systemd halted by itself (reboot(2) in its pid namespace: SIGINT, crun 130)
        assert machine.find(r'"name": "hostos", "status": "STOPPED", "reason": "exit (130|0)"',
                            mark) is not None, machine.log_path  # fmt: skip
        assert machine.find(r"stop timed out, killing", mark) is None
