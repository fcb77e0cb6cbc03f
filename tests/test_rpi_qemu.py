"""The rpi3 image on QEMU's raspi3b, end to end: firmware stand-in -> Debian's U-Boot ->
pvpy's boot script -> Debian's kernel -> ``pvpy init`` as PID 1, updated over the API.

QEMU 7.2's ``raspi3b`` is a Pi 3 Model B (BCM2837): Debian's ``u-boot-rpi``
(rpi_arm64, rpi4's build too) and kernel run on it unchanged. What QEMU does
instead of the Pi (qemu/raspi3b-uboot.cfg):

- the firmware: QEMU loads config.txt's ``kernel=`` (u-boot.bin) and hands it
  config.txt's ``device_tree=``, both read here from the image's FAT partition
  (``raspi_argv``); bootcode.bin and start.elf do not run;
- the network: no LAN9514 (the Pi's USB Ethernet) is emulated; a QEMU usb-net on
  the Pi's USB host controller (dwc2) is, which Debian's kernel drives with
  cdc_ether as eth0: the API is reached over it (hostfwd);
- the watchdog: QEMU's PM block resets the machine the moment the watchdog is
  started (it has no timer), so the test image is built from a copy of
  boards/rpi3 whose PID 1 opens none (``--watchdog ""`` added to its init_args;
  bcm2835_wdt still loads: reboots, panic=1 resets and power-off go through the PM
  block, as on a Pi);
- ``PYTHONHASHSEED=0`` on the test image's command line (from the spec): without a hardware RNG
  driver before PID 1 (bcm2835_rng is a module PID 1 loads) the kernel's random
  pool is not ready when Python starts from the initramfs, which has no
  /dev/urandom to fall back on ("Fatal Python error: _Py_HashRandomization_Init");
- QEMU's SD card wants a power-of-2 size: the copy booted here is grown to 1 GiB
  (the partitions stay as built).

One guest, in file order (each test also runs alone from the factory image):

    boot 1 through U-Boot: goals met, uboot.env read by U-Boot and PID 1
      -> BSP update 2 (new initrd): pv_try in uboot.env, reboot, U-Boot's marker
         (saveenv), TESTING, commit: DONE
      -> broken host OS 3: ERROR on its try, PID 1 clears the try, reboot: 2 again
      -> initrd 4 that never starts PID 1: panic=1 resets, U-Boot's marker: ERROR
      -> power cut while U-Boot writes the marker for try 5 (QEMU killed at
         "Saving Environment to FAT"), then the file torn the way a cut half-way
         leaves it: U-Boot's built-in environment, pvrev.env's revision boots;
         PID 1's next write makes uboot.env whole again

Slow: marker ``qemu``. Software emulation of a Pi 3 whose SD controller U-Boot
reads by PIO: U-Boot loads the 33 MB kernel and 55 MB initramfs at ~1 MB/s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from pvpy import rpiboot
from pvpy.errors import PvpyError
from pvpy.store import ObjectStore
from pvpy.workstation import qemu as qemu_mod
from pvpy.workstation.image import DEFAULT_SPEC, ImageBuild, build_board_revision, build_image
from pvpy.workstation.qemu import MACHINES, QEMU, Machine, ensure_qemu
from tests import apiclient
from tests.device import free_port

# Not in every CI run yet: ~15 minutes of emulation (U-Boot reads the SD by PIO),
# and not yet seen passing end to end (issue #16 stays open until it is).
SLOW = os.environ.get("PVPY_SLOW") == "1"
qemu = pytest.mark.qemu
pytestmark = pytest.mark.skipif(
    not SLOW, reason="raspi3b end to end: ~15 min of emulation; PVPY_SLOW=1 runs it"
)

REPO = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 900.0  # U-Boot reads ~90 MB by PIO under TCG; minutes on a busy 2-core box
PUSH_TIMEOUT = 1800.0
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
U_BOOT = r"^Loading Environment from FAT\.\.\."  # once per boot (rpi_arm64 prints no banner)
TEST_CMDLINE = "PYTHONHASHSEED=0"  # see the module docstring


# -- the firmware's part, done by QEMU ---------------------------------------------------------


def fat_read(disk: Path, start: int, name: str) -> bytes:
    out = subprocess.run(["mcopy", "-n", "-i", f"{disk}@@{start}", f"::/{name}", "-"],
                         check=True, capture_output=True, env=MTOOLS_ENV)  # fmt: skip
    return out.stdout


def fat_write(disk: Path, start: int, name: str, data: bytes, work: Path) -> None:
    src = work / name
    src.write_bytes(data)
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{start}", str(src), f"::/{name}"],
                   check=True, capture_output=True, env=MTOOLS_ENV)  # fmt: skip


def fat_start(disk: Path, number: int = 1) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], check=True,
                                      capture_output=True).stdout)  # fmt: skip
    return int(table["partitiontable"]["partitions"][number - 1]["start"]) * 512


def config_txt_value(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    return None


def raspi_argv(image_dir: Path, port: int) -> list[str]:
    """The QEMU command line for a U-Boot Pi image on raspi3b: what the firmware would
    load (config.txt's kernel= and device_tree=, out of the FAT partition) as -kernel
    and -dtb, the console on the second serial port (the mini UART).

    (pvpy.workstation.qemu.qemu_argv does not know raspi3b yet: the lead's to move
    this there; ``start_machine`` passes it to Machine meanwhile.)"""
    manifest = json.loads((image_dir / "image.json").read_text())
    disk = image_dir / manifest["disk"]
    start = fat_start(disk, int(manifest["partitions"]["config"]))
    config = fat_read(disk, start, manifest["boot_files"]["config"]).decode()
    stage = image_dir / ".qemu"
    stage.mkdir(exist_ok=True)
    loaded = {}
    for key in ("kernel", "device_tree"):
        name = config_txt_value(config, key)
        assert name, f"config.txt has no {key}="
        (stage / name).write_bytes(fat_read(disk, start, name))
        loaded[key] = stage / name
    q = manifest["qemu"]
    return [
        QEMU, "-readconfig", str(MACHINES / q["config"]), "-nographic", "-monitor", "none",
        "-serial", "null", "-serial", "stdio",
        "-kernel", str(loaded["kernel"]), "-dtb", str(loaded["device_tree"]),
        "-drive", f"if=none,id=disk0,format=raw,file={disk}",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:{int(q.get('guest_port', 8000))}",
    ]  # fmt: skip


def start_machine(image_dir: Path, port: int, log_path: Path) -> Machine:
    def argv(image: Path, port: int | None, no_reboot: bool = False) -> list[str]:
        assert port is not None
        return raspi_argv(Path(image), port)

    with mock.patch.object(qemu_mod, "qemu_argv", argv):
        machine = Machine(image_dir, port=port, log_path=log_path)
    return machine.start()


# -- the image and the guest -------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageBuild:
    """``pvpy image build --board rpi3`` of examples/demo, with what QEMU's raspi3b needs
    (the module docstring): PID 1 opens no watchdog, PYTHONHASHSEED on the command line."""
    import yaml

    try:
        ensure_qemu()
    except PvpyError as e:
        pytest.skip(f"qemu-system-aarch64 cannot be installed: {e}")
    board = tmp_path_factory.mktemp("board") / "rpi3"
    shutil.copytree(REPO / "boards/rpi3", board)  # boot.cmd: the shared script, copied
    text = (board / "board.yaml").read_text()
    line = 'init_args: [--api, --api-tcp, "0.0.0.0:8000"]'
    assert text.count(line) == 1, "boards/rpi3/board.yaml: no init_args line"
    (board / "board.yaml").write_text(text.replace(line, line[:-1] + ', --watchdog, ""]'))
    demo = tmp_path_factory.mktemp("demo")
    for spec in DEFAULT_SPEC.parent.glob("spec*.yaml"):
        doc = yaml.safe_load(spec.read_text())
        doc["bsp"] = {**(doc.get("bsp") or {}), "cmdline": TEST_CMDLINE}
        (demo / spec.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    for overlay in sorted((DEFAULT_SPEC.parent / "overlays").iterdir()):
        subprocess.run([str(REPO / "rootfs/busybox-tree"), str(demo / "build" / overlay.name),
                        str(overlay)], check=True, capture_output=True)  # fmt: skip
    return build_image(str(board), tmp_path_factory.mktemp("rpi3") / "img",
                       spec=demo / "spec.yaml")  # fmt: skip


@dataclass
class Guest:
    image: ImageBuild
    dir: Path  # the booted copy of the image
    work: Path
    port: int
    machine: Machine
    highest: int = 1
    starts: int = 1  # QEMU processes started (a power cut starts another)

    @property
    def disk(self) -> Path:
        return self.dir / self.image.disk.name

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET") -> Any:
        return apiclient.api_or_none(self.url, self.image.out / "api-token", path, method)

    def settled(self, revision: int | None = None, timeout: float = BOOT_TIMEOUT) -> Any:
        """/v1/status once ``revision`` (any: None) runs with all goals met and nothing
        under way; the API may be away (rebooting) meanwhile."""
        deadline = time.monotonic() + timeout
        status: Any = None
        while True:
            status = self.api("/v1/status")
            if (status and status["all_goals_met"] and status["updating"] is None
                    and not status["pending"]
                    and (revision is None or status["revision"] == revision)):  # fmt: skip
                return status
            assert self.machine.running(), f"qemu exited ({self.machine.log_path})"
            assert time.monotonic() < deadline, f"not settled on {revision}: {status}"
            time.sleep(2)

    def running(self) -> int:
        return int(self.settled()["revision"])

    def revision_dir(self, number: int) -> Path:
        """A revision sent to the guest (1: the factory one), signed, with its objects."""
        return self.image.revision_dir if number == 1 else self.work / f"rev{number}"

    def next_revision(self) -> int:
        self.highest += 1
        return self.highest

    def push(self, revision_dir: Path, wait: bool = True) -> subprocess.CompletedProcess[str]:
        follow = ["--timeout", str(PUSH_TIMEOUT)] if wait else ["--no-wait"]
        return subprocess.run(
            [sys.executable, "-m", "pvpy", "device", "push", self.url, str(revision_dir),
             "--token-file", str(self.image.out / "api-token"), *follow],
            capture_output=True, text=True, timeout=PUSH_TIMEOUT + 60,
        )  # fmt: skip

    def record(self, revision: int) -> Any:
        return self.api(f"/v1/revisions/{revision}")

    def power_cut_and_start(self, between: Callable[[], None] | None = None) -> None:
        """SIGKILL our QEMU (the disk keeps what QEMU wrote: host page cache, like the
        sandbox's power cuts), run ``between`` on the cold disk, start QEMU again."""
        assert self.machine.pid is not None
        os.kill(self.machine.pid, signal.SIGKILL)
        self.machine.stop()
        if between is not None:
            between()
        self.starts += 1
        self.machine = start_machine(self.dir, self.port, self.work / f"console{self.starts}.log")


@pytest.fixture(scope="module")
def guest(image: ImageBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("guest")
    copy = work / "image"
    copy.mkdir()
    shutil.copy(image.out / "image.json", copy)
    disk = copy / image.disk.name
    subprocess.run(["cp", "--sparse=always", str(image.disk), str(disk)], check=True)
    size = disk.stat().st_size
    os.truncate(disk, 1 << (size - 1).bit_length())  # QEMU's SD card: a power of 2
    port = free_port()
    g = Guest(image, copy, work, port, start_machine(copy, port, work / "console1.log"))
    try:
        yield g
    finally:
        g.machine.stop()


Edit = Callable[[dict[str, Any], ObjectStore], None]


def derive(guest: Guest, edit_for: Callable[[Path, int], Edit]) -> tuple[int, Path]:
    """The next revision: the running one (its signed dir: ``base``) as the edit that
    ``edit_for(base, number)`` makes changes its state, signed with the image's key."""
    from tests.qemu_guest import derive_revision

    base = guest.revision_dir(guest.running())
    number = guest.next_revision()
    assert guest.image.key is not None
    out = guest.work / f"rev{number}"
    return number, derive_revision(base, out, number, guest.image.key, edit_for(base, number))


def add_initrd_note(base: Path, number: int) -> Edit:
    """A new initramfs: the running one plus a second cpio archive (a BSP change)."""
    from tests.qemu_guest import cpio

    note = cpio(base.parent / f"note{number}", {"pvpy-update-note": f"revision {number}\n"})

    def edit(doc: dict[str, Any], objects: ObjectStore) -> None:
        data = (base / "objects" / doc["bsp"]["initrd"]["sha256"]).read_bytes() + note
        doc["bsp"]["initrd"] = {"sha256": objects.put_bytes(data), "size": len(data)}

    return edit


# -- the boots ----------------------------------------------------------------------------------


@qemu
@pytest.mark.timeout(1800)
def test_boot_through_u_boot_to_goals(guest: Guest) -> None:
    m, image = guest.machine, guest.image
    bsp = json.loads((image.revision_dir / "state.json").read_bytes())["bsp"]
    i = m.wait_for(rf"{U_BOOT} OK", 300)  # uboot.env read: its CRC is good
    i = m.wait_for(rf"pvpy-boot: rev 1 \[\] kernel {bsp['kernel']['sha256']} "
                   rf"initrd {bsp['initrd']['sha256']}", 120, i)  # fmt: skip
    i = m.wait_for(rf"pvpy-boot: device tree {bsp['dtb']['sha256']}", 60, i)
    i = m.wait_for(rf"pvpy-boot: booti, bootargs console=ttyS1,115200 quiet {TEST_CMDLINE} "
                   r"pv_rev=1\s*$", BOOT_TIMEOUT, i)  # fmt: skip
    i = m.wait_for(r'"spec": "LABEL=pvstorage".*"event": "storage mounted"', BOOT_TIMEOUT, i)
    m.wait_for(r'"device": "/dev/mmcblk0p1", "target": "/run/pvpy-config".*"config partition '
               r'mounted"', 120, i)  # fmt: skip
    m.wait_for(r'"revision": 1, "trying": false, "failed_try": null, "event": "boot choice"',
               120, i)  # fmt: skip
    i = m.wait_for(r'"revision": 1, "trying": false, "event": "booting revision"', BOOT_TIMEOUT, i)
    m.wait_for(r'"name": "hostos", "status": "STARTED"', BOOT_TIMEOUT, i)
    m.wait_for(r'"name": "web", "status": "READY"', BOOT_TIMEOUT, i)
    # The Ethernet is a USB device (usb-net here, the LAN9514 on a Pi 3): it must be
    # there when PID 1 starts DHCP on eth0, or the API is never reachable.
    late = m.find(r"udhcpc: SIOCGIFINDEX: No such device")
    assert late is None, "eth0 appeared after PID 1 ran DHCP (setup_network does not wait for it)"
    status = guest.settled(1)
    assert status["pid"] == 1 and (status["revision"], status["committed"]) == (1, 1)
    states = {c["name"]: c["status"] for c in status["containers"]}
    assert states == {"hostos": "STARTED", "hello": "STARTED", "web": "READY"}
    assert m.find(r"Traceback") is None, "a Python traceback on the console"


@qemu
@pytest.mark.timeout(3600)
def test_bsp_update_commits_after_a_reboot_through_u_boot(guest: Guest) -> None:
    """A new initramfs: PID 1 writes pv_try into uboot.env and reboots; U-Boot saves
    its marker (saveenv) and boots the try once; PID 1 tests it and commits into
    uboot.env, then pvrev.env: DONE."""
    m = guest.machine
    guest.settled()
    number, rev = derive(guest, add_initrd_note)
    initrd = json.loads((rev / "state.json").read_bytes())["bsp"]["initrd"]["sha256"]
    mark = len(m.lines)
    push = guest.push(rev)
    out = push.stdout + push.stderr
    assert push.returncode == 0, out
    assert re.search(rf"revision {number}: DONE", out), out
    i = m.wait_for(U_BOOT, 60, mark)
    i = m.wait_for(r"Saving Environment to FAT\.\.\. OK", 120, i)
    i = m.wait_for(rf"pvpy-boot: trying revision {number} once \(marker written\)", 60, i)
    i = m.wait_for(rf"pvpy-boot: rev {number} \[pv_trying=1\] kernel \w+ initrd {initrd}", 60, i)
    m.wait_for(rf'"revision": {number}, "trying": true, "failed_try": null, '
               r'"event": "boot choice"', 120, i)  # fmt: skip
    status = guest.settled(number)
    assert (status["committed"], status["try"], status["trying"]) == (number, None, False)
    record = guest.record(number)
    assert (record["status"], record["kind"]) == ("DONE", "reboot"), record
    assert m.find(r"Traceback", mark) is None, "a Python traceback on the console"


@qemu
@pytest.mark.timeout(3600)
def test_broken_host_os_falls_back_on_the_next_boot(guest: Guest) -> None:
    m = guest.machine
    good = guest.running()

    def break_host_os(doc: dict[str, Any], _objects: ObjectStore) -> None:
        hostos = doc["containers"]["hostos"]
        hostos["args"] = ["/bin/sh", "-c", "echo hostos: broken on purpose; exit 7"]
        hostos["restart"]["policy"] = "no"

    number, rev = derive(guest, lambda _base, _n: break_host_os)
    mark = len(m.lines)
    push = guest.push(rev)
    assert push.returncode == 3, push.stdout + push.stderr  # ERROR
    i = m.wait_for(rf"pvpy-boot: trying revision {number} once \(marker written\)",
                   BOOT_TIMEOUT, mark)  # fmt: skip
    i = m.wait_for(r'"event": "update failed; rolling back"', BOOT_TIMEOUT, i)
    i = m.wait_for(U_BOOT, BOOT_TIMEOUT, i)
    m.wait_for(rf"pvpy-boot: booti, bootargs console=ttyS1,115200 quiet {TEST_CMDLINE} "
               rf"pv_rev={good}\s*$", BOOT_TIMEOUT, i)  # fmt: skip
    status = guest.settled(good)
    assert (status["committed"], status["try"]) == (good, None), status
    record = guest.record(number)
    assert (record["status"], record["kind"]) == ("ERROR", "reboot"), record
    assert "host OS container failed" in record["reason"], record


@qemu
@pytest.mark.timeout(3600)
def test_try_that_never_reaches_pid1_falls_back_by_boot_counting(guest: Guest) -> None:
    """An initramfs whose /init cannot run: the kernel panics, panic=1 resets through
    the PM block; U-Boot finds its marker (pv_trying == pv_try) and boots the last
    good revision with pv_failed_try; PID 1 records ERROR and clears the try."""
    from tests.qemu_guest import cpio

    m = guest.machine
    good = guest.running()
    broken = cpio(guest.work / "broken", {"init": "not a program\n"})  # 0644: EACCES

    def break_initrd(doc: dict[str, Any], objects: ObjectStore) -> None:
        doc["bsp"]["initrd"] = {"sha256": objects.put_bytes(broken), "size": len(broken)}
        doc["bsp"]["cmdline"] = doc["bsp"].get("cmdline", "") + " panic=1"

    number, rev = derive(guest, lambda _base, _n: break_initrd)
    mark = len(m.lines)
    push = guest.push(rev, wait=False)
    assert push.returncode == 0, push.stderr + push.stdout
    i = m.wait_for(rf"pvpy-boot: trying revision {number} once \(marker written\)",
                   BOOT_TIMEOUT, mark)  # fmt: skip
    i = m.wait_for(r"Kernel panic", BOOT_TIMEOUT, i)
    i = m.wait_for(U_BOOT, 300, i)  # the reset
    i = m.wait_for(rf"pvpy-boot: try {number} did not commit: falling back to {good}", 120, i)
    m.wait_for(rf"pv_rev={good} pv_failed_try={number}\s*$", BOOT_TIMEOUT, i)
    guest.settled(good)
    deadline = time.monotonic() + 120
    while (record := guest.record(number))["status"] != "ERROR":
        assert time.monotonic() < deadline, record
        time.sleep(2)
    status = guest.settled(good)
    assert (status["committed"], status["try"]) == (good, None), status


@qemu
@pytest.mark.timeout(3600)
def test_power_cut_while_u_boot_writes_its_env(guest: Guest) -> None:
    """QEMU killed the moment U-Boot starts writing uboot.env (the marker of try N),
    then uboot.env torn as a cut half-way through that write leaves it (the kill
    alone may land before, during or after the write: the file is made torn so the
    case is the same every run). U-Boot boots on its built-in environment ("bad
    CRC"), the script takes pv_rev from pvrev.env: the committed revision runs,
    with all goals; the forgotten try is ERROR. PID 1's next write (an app-only
    update's commit) makes uboot.env whole again: read back from the host."""
    m = guest.machine
    good = guest.running()
    number, rev = derive(guest, add_initrd_note)
    mark = len(m.lines)
    push = guest.push(rev, wait=False)
    assert push.returncode == 0, push.stderr + push.stdout
    m.wait_for(r"Saving Environment to FAT\.\.\.", BOOT_TIMEOUT, mark)
    start = fat_start(guest.disk)

    def tear() -> None:
        """Only the first sector of the write landed: the rest is the factory image's
        (older) uboot.env, and the CRC no longer matches."""
        env = fat_read(guest.disk, start, rpiboot.UBOOT_ENV)
        older = fat_read(guest.image.disk, start, rpiboot.UBOOT_ENV)
        assert len(env) == len(older) == rpiboot.UBOOT_ENV_SIZE
        torn = env[:512] + older[512:]
        assert struct.unpack_from("<I", torn)[0] != zlib.crc32(torn[4:])
        fat_write(guest.disk, start, rpiboot.UBOOT_ENV, torn, guest.work)

    guest.power_cut_and_start(tear)
    m = guest.machine
    i = m.wait_for(r"bad CRC, using default environment", 300)
    i = m.wait_for(r"pvpy-boot: no pv_rev in the environment: the committed one from pvrev.env",
                   300, i)  # fmt: skip
    m.wait_for(rf"pvpy-boot: booti, bootargs console=ttyS1,115200 quiet {TEST_CMDLINE} "
               rf"pv_rev={good}\s*$", BOOT_TIMEOUT, i)  # fmt: skip
    status = guest.settled(good)
    assert (status["committed"], status["try"]) == (good, None), status
    assert guest.record(number)["status"] == "ERROR"
    # An app-only update: PID 1 commits it with one write, from U-Boot's defaults.
    app = guest.next_revision()
    spec_v2 = guest.image.spec.parent / "spec-v2.yaml"
    rev_app = build_board_revision(guest.image, spec_v2, guest.work / f"rev{app}",
                                   bsp_from=guest.revision_dir(good), revision=app)  # fmt: skip
    push = guest.push(rev_app)
    assert push.returncode == 0 and f"revision {app}: UPDATED" in push.stdout + push.stderr, push
    guest.settled(app)
    assert guest.api("/v1/commands/poweroff", method="POST") == {"command": "poweroff"}
    deadline = time.monotonic() + 300
    while guest.machine.running():  # the PM block powers QEMU off
        assert time.monotonic() < deadline, "qemu still running after the power off"
        time.sleep(1)
    config = guest.work / "fw_env.config"
    copy = guest.work / "uboot.env"
    copy.write_bytes(fat_read(guest.disk, start, rpiboot.UBOOT_ENV))
    config.write_text(f"{copy} 0x0 {rpiboot.UBOOT_ENV_SIZE:#x}\n")
    printed = subprocess.run(["fw_printenv", "-c", str(config)], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr  # a good CRC again
    values = dict(line.split("=", 1) for line in printed.stdout.splitlines())
    assert values["pv_rev"] == str(app) and values["bootdelay"] == "0", values
    assert values["bootcmd"].startswith("if load mmc 0:1 ${scriptaddr} /boot.scr")
    assert fat_read(guest.disk, start, rpiboot.COMMITTED) == f"pv_rev={app}\n".encode()
