"""Boot a real qemu-arm64 image: U-Boot -> kernel -> ``pvpy init`` as PID 1 -> containers.

Slow (marker ``qemu``): the first run downloads ~85 MB of Debian arm64 packages
into ~/.cache/pvpy; later runs reuse them (image build ~5-15 s, boot to all
goals met ~20 s under TCG). Skipped only when qemu-system-aarch64 cannot be
installed.

The booted tests share ONE guest (the module fixture ``guest``: boots are
slow) and run in file order. Each pushes, from the host over the forwarded API
port with ``pvpy device push``, a revision made from the one the guest runs at
that moment and signed with the image's key:

    boot 1 -> app-only update 2 (UPDATED, no reboot, same PIDs)
           -> new initrd 3 (try-boot through U-Boot, TESTING, commit: DONE)
           -> host OS dies on its try 4 (ERROR, PID 1 rolls back: 3 again)
           -> initrd without pvpy 5 (panic; U-Boot's marker falls back: ERROR)
           -> power off through the API (QEMU exits by itself)

Each test also runs alone (``-k``), from the factory revision. QEMU is always
stopped (context manager in the fixture), also when a check fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pvpy.device.board import boot_choice
from pvpy.errors import DeviceError, PvpyError
from pvpy.store import ObjectStore, boot_env
from pvpy.workstation.image import DEFAULT_SPEC, ImageBuild, build_board_revision, build_image
from pvpy.workstation.image.modules import load_order
from pvpy.workstation.qemu import Machine, ensure_qemu
from tests import apiclient
from tests.qemu_guest import cpio, derive_revision, free_port

qemu = pytest.mark.qemu

BOOT_TIMEOUT = 180.0  # TCG on a busy 2-core box; ~20 s when idle
PUSH_TIMEOUT = 600.0  # a try-boot: upload, reboot, boot, the 25 s commit delay
UBOOT = r"^U-Boot 20"


# -- quick checks of the pieces (no QEMU) ------------------------------------------------


def test_boot_choice_from_cmdline() -> None:
    c = boot_choice("console=ttyAMA0 quiet pv_rev=3 pv_trying=1 pv_storage=/dev/vdb1\n")
    assert (c.revision, c.trying, c.failed_try, c.storage) == (3, True, None, "/dev/vdb1")
    c = boot_choice("pv_rev=1 pv_failed_try=2")
    assert (c.revision, c.trying, c.failed_try, c.storage) == (1, False, 2, None)
    assert boot_choice("quiet").revision is None


def test_boot_env_names_the_bsp_objects() -> None:
    k, i = "a" * 64, "b" * 64
    state = json.dumps(
        {
            "revision": 1,
            "bsp": {
                "kernel": {"sha256": k, "size": 1},
                "initrd": {"sha256": i, "size": 1},
                "cmdline": "quiet\n panic=1",
            },
        }
    ).encode()
    assert boot_env(state) == f"pv_kernel={k}\npv_initrd={i}\npv_cmdline=quiet panic=1\n".encode()
    assert boot_env(b'{"revision": 1, "containers": {}}') is None
    assert boot_env(b"not json") is None


def test_module_load_order(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    for rel, deps in {
        "fs/ext4/ext4.ko": "jbd2,mbcache,crc16",
        "fs/jbd2/jbd2.ko": "",
        "fs/mbcache.ko": "",
        "lib/crc16.ko": "",
        "drivers/virtio_blk.ko": "",
    }.items():
        (kernel / rel).parent.mkdir(parents=True, exist_ok=True)
        (kernel / rel).write_bytes(b"\x7fELF...\0license=GPL\0depends=" + deps.encode() + b"\0")
    order = load_order(kernel, ["virtio-blk", "ext4", "crc16"])
    assert order == [
        "drivers/virtio_blk.ko",
        "fs/jbd2/jbd2.ko",
        "fs/mbcache.ko",
        "lib/crc16.ko",
        "fs/ext4/ext4.ko",
    ]
    with pytest.raises(DeviceError, match="not found"):
        load_order(kernel, ["nosuch"])


# -- the image, booted -----------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageBuild:
    try:
        ensure_qemu()
    except PvpyError as e:
        pytest.skip(f"qemu-system-aarch64 cannot be installed: {e}")
    # examples/demo's specs with their rootfs trees built here, as make-rootfs
    # does: a demo running meanwhile rebuilds examples/demo/build in place.
    demo = tmp_path_factory.mktemp("demo")
    for spec in DEFAULT_SPEC.parent.glob("spec*.yaml"):
        shutil.copy(spec, demo / spec.name)
    busybox_tree = DEFAULT_SPEC.parents[2] / "rootfs" / "busybox-tree"
    for overlay in sorted((DEFAULT_SPEC.parent / "overlays").iterdir()):
        subprocess.run([str(busybox_tree), str(demo / "build" / overlay.name), str(overlay)],
                       check=True)  # fmt: skip
    return build_image("qemu-arm64", tmp_path_factory.mktemp("qemu") / "img",
                       spec=demo / "spec.yaml")  # fmt: skip


@dataclass
class Guest:
    """The booted image, its API through hostfwd, and the revisions sent to it."""

    image: ImageBuild
    machine: Machine
    port: int
    work: Path
    revisions: dict[int, Path] = field(default_factory=dict)  # number -> signed dir
    highest: int = 1  # the highest revision ever sent (anti-rollback)
    boots: int = 1  # the boots the tests caused so far (the first one included)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_file(self) -> Path:
        return self.image.out / "api-token"

    def api(self, path: str, method: str = "GET") -> Any:
        return apiclient.api(self.url, self.token_file, path, method)

    def settled(self, revision: int | None = None, timeout: float = BOOT_TIMEOUT) -> Any:
        """/v1/status once the guest runs ``revision`` (any: None) with all goals met
        and no update or shutdown under way; the API may be away (rebooting) meanwhile."""
        deadline = time.monotonic() + timeout
        status: Any = None
        while True:
            try:
                status = self.api("/v1/status")
            except PvpyError:
                status = None
            if (
                status
                and status["all_goals_met"]
                and status["updating"] is None
                and not status["pending"]
                and (revision is None or status["revision"] == revision)
            ):
                return status
            assert self.machine.running(), f"qemu exited ({self.machine.log_path})"
            assert time.monotonic() < deadline, f"not settled on {revision}: {status}"
            time.sleep(1)

    def running(self) -> tuple[int, Path]:
        """The revision the guest runs and its signed directory on the host."""
        number = int(self.settled()["revision"])
        return number, self.revisions[number]

    def next_revision(self) -> int:
        self.highest += 1
        return self.highest

    def push(self, revision_dir: Path, wait: bool = True) -> subprocess.CompletedProcess[str]:
        """``pvpy device push`` from the host (following the revision to its end)."""
        follow = ["--timeout", str(PUSH_TIMEOUT)] if wait else ["--no-wait"]
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pvpy",
                "device",
                "push",
                self.url,
                str(revision_dir),
                "--token-file",
                str(self.token_file),
                *follow,
            ],
            capture_output=True,
            text=True,
            timeout=PUSH_TIMEOUT + 60,
        )

    def banners(self) -> int:
        """How often U-Boot started: one per boot, whatever caused it."""
        return sum(1 for _, line in self.machine.lines if re.search(UBOOT, line))

    def record(self, revision: int) -> Any:
        return self.api(f"/v1/revisions/{revision}")


@pytest.fixture(scope="module")
def guest(image: ImageBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("guest")
    port = free_port()
    with Machine(image.out, port=port, log_path=work / "console.log") as machine:
        yield Guest(
            image, machine, port, work, {image.revision: image.revision_dir}, image.revision
        )
    assert not machine.running()


@qemu
@pytest.mark.timeout(900)
def test_image_layout(image: ImageBuild) -> None:
    assert image.disk.stat().st_size > 512 << 20
    table = json.loads(
        subprocess.run(["sfdisk", "-J", str(image.disk)], check=True, capture_output=True).stdout
    )["partitiontable"]
    assert [p["name"] for p in table["partitions"]] == ["storage", "pvmarker"]
    env = (image.out / "uboot-env.img").read_bytes()
    assert b"bootdelay=0\0" in env and b"/boot.scr" in env


@qemu
@pytest.mark.timeout(900)
def test_boot_to_goals(guest: Guest) -> None:
    m, image = guest.machine, guest.image
    m.wait_for(UBOOT, 30)
    # boot.env (written by Storage.install_revision) names the signed BSP objects.
    bsp = json.loads((image.revision_dir / "state.json").read_bytes())["bsp"]
    m.wait_for(
        rf"pvpy-boot: rev 1 \[\] kernel {bsp['kernel']['sha256']} "
        rf"initrd {bsp['initrd']['sha256']}",
        30,
    )
    m.wait_for(r"pvpy-boot: booti, bootargs console=ttyAMA0 quiet pv_rev=1", 30)
    m.wait_for(r'"event": "modules loaded"', BOOT_TIMEOUT)
    m.wait_for(r'"event": "storage mounted"', 30)
    m.wait_for(r'"path": "/dev/watchdog".*"event": "watchdog opened"', 30)
    m.wait_for(r'"revision": 1, "trying": false, "event": "booting revision"', BOOT_TIMEOUT)
    m.wait_for(r'"name": "hostos", "status": "STARTED"', BOOT_TIMEOUT)
    m.wait_for(r'"name": "web", "status": "READY"', BOOT_TIMEOUT)
    # The device API (PID 1's control plane, its own process) through
    # hostfwd 127.0.0.1:port -> guest :8000, with the provisioned token.
    m.wait_for(r"api serving", 60)
    status = guest.settled(1)
    assert status["pid"] == 1  # pvpy init is PID 1 of the guest
    assert status["revision"] == 1 and status["committed"] == 1
    states = {c["name"]: c["status"] for c in status["containers"]}
    assert states == {"hostos": "STARTED", "hello": "STARTED", "web": "READY"}
    assert m.find(r"Traceback") is None, "a Python traceback on the console"


@qemu
@pytest.mark.timeout(900)
def test_app_update_without_reboot(guest: Guest) -> None:
    """spec-v2 (only the web image changes), built for the board on the running
    revision's BSP: only web restarts, no reboot (no new U-Boot banner), UPDATED."""
    m = guest.machine
    _, base = guest.running()
    before = guest.settled()
    number = guest.next_revision()
    rev = build_board_revision(
        guest.image,
        guest.image.spec.parent / "spec-v2.yaml",
        guest.work / f"rev{number}",
        bsp_from=base,
        revision=number,
    )
    mark = len(m.lines)
    push = guest.push(rev)
    out = push.stdout + push.stderr
    assert push.returncode == 0, out
    # Only the new web image travels; PID 1 restarts only web. (The progress lines
    # push prints are samples: a short step such as "restarting" may be missed.)
    assert f"revision {number}: 5 object(s), 1 missing" in out, out
    assert re.search(rf"revision {number}: UPDATED", out), out
    after = guest.settled(number)
    assert after["committed"] == number and after["try"] is None, after
    record = guest.record(number)
    assert (record["status"], record["kind"]) == ("UPDATED", "app"), record
    pid = {c["name"]: c["pid"] for c in before["containers"]}
    new_pid = {c["name"]: c["pid"] for c in after["containers"]}
    assert new_pid["hostos"] == pid["hostos"] and new_pid["hello"] == pid["hello"], (pid, new_pid)
    assert new_pid["web"] != pid["web"], (pid, new_pid)
    assert m.find(UBOOT, mark) is None, "the guest rebooted for an app-only update"
    assert m.find(r"Traceback", mark) is None, "a Python traceback on the console"
    guest.revisions[number] = rev


@qemu
@pytest.mark.timeout(900)
def test_new_initrd_try_boots_and_commits(guest: Guest) -> None:
    """The running revision with its initramfs plus one file (a second cpio archive
    appended: the kernel unpacks both): a BSP change, so PID 1 sets pv_try and
    reboots; U-Boot tries it once; PID 1 tests it and commits: DONE, try cleared."""
    m, image = guest.machine, guest.image
    _, base = guest.running()
    number = guest.next_revision()
    note = cpio(guest.work / f"note{number}", {"pvpy-update-note": f"revision {number}\n"})
    new_initrd: dict[str, Any] = {}

    def add_a_file(doc: dict[str, Any], objects: ObjectStore) -> None:
        data = (base / "objects" / doc["bsp"]["initrd"]["sha256"]).read_bytes() + note
        new_initrd.update(sha256=objects.put_bytes(data), size=len(data))
        doc["bsp"]["initrd"] = dict(new_initrd)

    assert image.key is not None
    rev = derive_revision(base, guest.work / f"rev{number}", number, image.key, add_a_file)
    kernel = json.loads((rev / "state.json").read_bytes())["bsp"]["kernel"]["sha256"]
    mark = len(m.lines)
    push = guest.push(rev)
    out = push.stdout + push.stderr
    assert push.returncode == 0, out
    assert re.search(rf"revision {number}: TESTING", out), out  # 25 s: never missed
    assert re.search(rf"revision {number}: DONE", out), out
    i = m.wait_for(UBOOT, 10, mark)
    i = m.wait_for(rf"pvpy-boot: trying revision {number} once \(marker written\)", 10, i)
    i = m.wait_for(rf"pvpy-boot: rev {number} \[pv_trying=1\] kernel {kernel} "
                   rf"initrd {new_initrd['sha256']}", 10, i)  # fmt: skip
    m.wait_for(rf'"revision": {number}, "trying": true, "failed_try": null, '
               r'"event": "boot choice"', 10, i)  # fmt: skip
    status = guest.settled(number)
    assert status["committed"] == number, status
    assert status["try"] is None and status["trying"] is False, status  # pv_try cleared
    record = guest.record(number)
    assert (record["status"], record["kind"]) == ("DONE", "reboot"), record
    assert m.find(r"Traceback", mark) is None, "a Python traceback on the console"
    guest.revisions[number] = rev
    guest.boots += 1  # the try


@qemu
@pytest.mark.timeout(900)
def test_host_os_dying_on_its_try_falls_back(guest: Guest) -> None:
    """A host OS container that exits at once (restart: no): a host OS change, so a
    try-boot; the host OS failing while TESTING makes PID 1 record ERROR, clear
    pv_try and reboot; U-Boot boots the last good revision again."""
    m, image = guest.machine, guest.image
    good, base = guest.running()
    number = guest.next_revision()

    def break_host_os(doc: dict[str, Any], _objects: ObjectStore) -> None:
        hostos = doc["containers"]["hostos"]
        hostos["args"] = ["/bin/sh", "-c", "echo hostos: broken on purpose; exit 7"]
        hostos["restart"]["policy"] = "no"

    assert image.key is not None
    rev = derive_revision(base, guest.work / f"rev{number}", number, image.key, break_host_os)
    mark = len(m.lines)
    push = guest.push(rev)
    out = push.stdout + push.stderr
    assert push.returncode == 3, out  # ERROR
    i = m.wait_for(rf"pvpy-boot: trying revision {number} once \(marker written\)",
                   BOOT_TIMEOUT, mark)  # fmt: skip
    i = m.wait_for(r'"event": "update failed; rolling back"', BOOT_TIMEOUT, i)
    i = m.wait_for(UBOOT, BOOT_TIMEOUT, i)
    m.wait_for(rf"pvpy-boot: booti, bootargs console=ttyAMA0 quiet pv_rev={good}\s*$", 30, i)
    status = guest.settled(good)
    assert status["committed"] == good and status["try"] is None, status
    record = guest.record(number)
    assert (record["status"], record["kind"]) == ("ERROR", "reboot"), record
    assert "host OS container failed" in record["reason"], record
    assert m.find(r"Traceback", mark) is None, "a Python traceback on the console"
    guest.boots += 2  # the try, the way back


@qemu
@pytest.mark.timeout(900)
def test_try_boot_falls_back(guest: Guest) -> None:
    """A revision whose initrd never starts pvpy: PID 1 sets pv_try and reboots;
    U-Boot writes its marker and tries it; the kernel panics (``panic=1`` resets);
    U-Boot sees its marker and boots the last good revision with pv_failed_try;
    PID 1 records ERROR and clears pv_try. Only U-Boot's marker can tell."""
    m, image = guest.machine, guest.image
    good, base = guest.running()
    number = guest.next_revision()
    broken = cpio(guest.work / f"broken{number}", {"init": "not a program\n"})  # 0644: EACCES

    def break_initrd(doc: dict[str, Any], objects: ObjectStore) -> None:
        doc["bsp"]["initrd"] = {"sha256": objects.put_bytes(broken), "size": len(broken)}
        doc["bsp"]["cmdline"] = doc["bsp"].get("cmdline", "") + " panic=1"

    assert image.key is not None
    rev = derive_revision(base, guest.work / f"rev{number}", number, image.key, break_initrd)
    mark = len(m.lines)
    push = guest.push(rev, wait=False)
    assert push.returncode == 0, push.stderr + push.stdout
    i = m.wait_for(rf"pvpy-boot: trying revision {number} once \(marker written\)",
                   BOOT_TIMEOUT, mark)  # fmt: skip
    i = m.wait_for(r"Kernel panic", 120, i)
    i = m.wait_for(rf"pvpy-boot: try {number} did not commit: falling back to {good}", 60, i)
    i = m.wait_for(rf"bootargs console=ttyAMA0 quiet pv_rev={good} pv_failed_try={number}",
                   30, i)  # fmt: skip
    m.wait_for(rf'"revision": {good}, "trying": false, "failed_try": {number}, '
               r'"event": "boot choice"', BOOT_TIMEOUT, i)  # fmt: skip
    guest.settled(good)  # the API is up again
    deadline = time.monotonic() + 60
    while (record := guest.record(number))["status"] != "ERROR":
        assert time.monotonic() < deadline, record
        time.sleep(1)
    status = guest.settled(good)
    assert status["committed"] == good
    assert status["try"] is None  # cleared after the failure was recorded
    guest.boots += 2  # the try (panicked), the way back


@qemu
@pytest.mark.timeout(300)
def test_poweroff_through_the_api(guest: Guest) -> None:
    """POST /v1/commands/poweroff: containers stop in order, PID 1 powers off
    (PSCI SYSTEM_OFF) and QEMU ends by itself, exit 0. Before that: the guest
    booted exactly as often as the tests made it, so in all those minutes the
    i6300esb watchdog PID 1 opened (30 s heartbeat) never reset it: PID 1 fed it."""
    m = guest.machine
    guest.settled()
    assert m.find(r'"path": "/dev/watchdog".*"event": "watchdog opened"') is not None
    assert guest.banners() == guest.boots, (guest.banners(), guest.boots)
    mark = len(m.lines)
    assert guest.api("/v1/commands/poweroff", method="POST") == {"command": "poweroff"}
    m.wait_for(r'"action": "poweroff", "event": "goodbye"', 60, mark)
    deadline = time.monotonic() + 60
    while m.running():
        assert time.monotonic() < deadline, "qemu still running after the power off"
        time.sleep(0.2)
    assert m.status == 0
    assert m.find(UBOOT, mark) is None
