"""``pvpy qemu run``: boot an image of ``pvpy image build`` on qemu-system-aarch64.

The machine is a QEMU ``-readconfig`` file in the repository's ``qemu/``
folder, named by the board's ``qemu.config`` (copied into the image's
``image.json``): ``virt-uboot.cfg`` for qemu-arm64, ``virt-direct.cfg`` for the
Raspberry Pi images (see qemu/README.md). It holds ``virt`` with 512 MiB, the
disk on virtio-blk, virtio-net, virtio-rng and an i6300esb watchdog that
resets the machine. ``qemu_argv`` adds what differs per image or per run, or
what QEMU 7.2 cannot read from a file: ``-cpu`` (the board's ``qemu.cpu``),
``-nographic``, the boot (Debian's U-Boot as ``-bios`` with its env flash
read-only on pflash unit 1, since QEMU 7.2.9+ breaks pflash writes and the try
marker lives on the disk; or the Pi's kernel, initramfs and command line
directly), the disk's file, and user networking with one ``hostfwd`` on
127.0.0.1 only (host PORT -> the guest's API port). Software emulation (TCG):
KVM only helps an arm64 host.

The serial console goes to stdout (unless quiet) and to a log file, each line
prefixed with host seconds since start: the console is the only witness of a
watchdog reset (without -no-reboot QEMU restarts the machine in place).
``Machine`` is what the tests use: start, ``wait_for`` a console pattern, stop
— it only ever signals its own QEMU process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from pvpy import _run
from pvpy.errors import DeviceError, UsageError
from pvpy.log import get_logger
from pvpy.workstation.image.context import IMAGE_MANIFEST

log = get_logger("qemu")

QEMU = "qemu-system-aarch64"
HOST_PACKAGES = {QEMU: "qemu-system-arm"}
MACHINES = Path(__file__).resolve().parents[2] / "qemu"  # the -readconfig files
UBOOT_MACHINE = "virt-uboot.cfg"  # for an image.json without qemu.config (older images)
DIRECT_MACHINE = "virt-direct.cfg"

__all__ = ["MACHINES", "Machine", "ensure_qemu", "machine_config", "qemu_argv"]


def ensure_qemu() -> None:
    """Install qemu-system-arm when missing (apt-get). Raises CommandError."""
    from pvpy.workstation.image.packages import ensure_debian_packages

    ensure_debian_packages(HOST_PACKAGES)


def _manifest(image: Path) -> tuple[Path, dict[str, Any]]:
    image_dir = image if image.is_dir() else image.parent
    try:
        manifest = json.loads((image_dir / IMAGE_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{image_dir}: not an image of `pvpy image build` ({e})") from e
    if not isinstance(manifest, dict):
        raise UsageError(f"{image_dir / IMAGE_MANIFEST}: not an object")
    if not image.is_dir():
        manifest["disk"] = image.name
    return image_dir, manifest


def _fat_read(disk: Path, start: int, name: str) -> bytes:
    """A file from the FAT filesystem at byte ``start`` of ``disk`` (mtools: no mount)."""
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return _run.run(["mcopy", "-n", "-i", f"{disk}@@{start}", f"::/{name}", "-"], env=env).stdout


def _rpi_direct_boot(image_dir: Path, m: dict[str, Any]) -> list[str]:
    """What the Pi firmware would load, loaded by QEMU on ``virt`` instead (QEMU 7.2
    has no Pi 4/5 machine): the kernel, initramfs and command line of the boot
    partition ``autoboot.txt`` names in ``[all]`` (the committed one), copied to
    ``.qemu/`` of the image; the console word becomes virt's. No tryboot here:
    the firmware's one-shot flag has no QEMU counterpart."""
    from pvpy.rpiboot import AUTOBOOT, parse_autoboot_partition

    disk = image_dir / m["disk"]
    table = json.loads(_run.run(["sfdisk", "--json", str(disk)]).stdout)
    starts = [int(p["start"]) * 512 for p in table["partitiontable"]["partitions"]]
    parts, files, q = m["partitions"], m["boot_files"], m.get("qemu", {})
    autoboot = _fat_read(disk, starts[int(parts["config"]) - 1], AUTOBOOT).decode()
    number = parse_autoboot_partition(autoboot) or int(parts["boot"][0])
    boot = starts[number - 1]
    stage = image_dir / ".qemu"
    stage.mkdir(exist_ok=True)
    for part in ("kernel", "initrd"):
        (stage / part).write_bytes(_fat_read(disk, boot, files[part]))
    words = _fat_read(disk, boot, files["cmdline"]).decode().split()
    console = str(q.get("console", "ttyAMA0"))
    cmdline = " ".join(f"console={console}" if w.startswith("console=") else w for w in words)
    log.info("direct kernel boot", partition=number, cmdline=cmdline)
    return ["-kernel", str(stage / "kernel"), "-initrd", str(stage / "initrd"), "-append", cmdline]


def machine_config(manifest: dict[str, Any]) -> Path:
    """The machine's -readconfig file in ``qemu/`` for an image's ``image.json``.

    Raises UsageError when the file is not there.
    """
    default = UBOOT_MACHINE if manifest.get("u_boot") else DIRECT_MACHINE
    path = MACHINES / str((manifest.get("qemu") or {}).get("config") or default)
    if not path.is_file():
        raise UsageError(f"no QEMU machine file {path} (board.yaml qemu.config)")
    return path


def qemu_argv(image: Path, port: int | None = 8022, no_reboot: bool = False) -> list[str]:
    """The QEMU command line for an image directory (or its disk image).

    The machine comes from its file (``machine_config``); the command line adds
    what that file cannot hold. U-Boot images boot through U-Boot (``-bios``);
    Raspberry Pi images boot their committed boot partition's kernel directly
    (``_rpi_direct_boot``). Raises UsageError for a directory that is no image.
    """
    image_dir, m = _manifest(Path(image))
    q = m.get("qemu", {})
    netdev = "user,id=net0"  # the machine file's virtio-net-pci refers to net0
    if port:
        netdev += f",hostfwd=tcp:127.0.0.1:{port}-:{int(q.get('guest_port', 8000))}"
    if m.get("u_boot"):
        firmware = [
            "-bios", str(m["u_boot"]),
            "-drive", f"if=pflash,unit=1,format=raw,readonly=on,file={image_dir / m['env_flash']}",
        ]  # fmt: skip
    else:
        firmware = _rpi_direct_boot(image_dir, m)
    argv = [
        QEMU, "-readconfig", str(machine_config(m)), "-cpu", str(q.get("cpu", "cortex-a72")),
        "-nographic", *firmware,
        "-drive", f"if=none,id=disk0,format=raw,file={image_dir / m['disk']}",  # virtio-blk's
        "-netdev", netdev,
    ]  # fmt: skip
    if no_reboot:
        argv.append("-no-reboot")
    return argv


class Machine:
    """One QEMU process with its console captured. Use as a context manager."""

    def __init__(
        self, image: Path, port: int | None = 8022, log_path: Path | None = None,
        echo: TextIO | None = None, no_reboot: bool = False,
    ) -> None:  # fmt: skip
        self.argv = qemu_argv(Path(image), port, no_reboot)
        image_dir = Path(image) if Path(image).is_dir() else Path(image).parent
        self.log_path = Path(log_path or image_dir / "console.log")
        self.echo = echo
        self.lines: list[tuple[float, str]] = []
        self.pid: int | None = None
        self.status: int | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.started = 0.0

    def start(self) -> Machine:
        ensure_qemu()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = _run.spawn(self.argv, stdout=write_fd, stderr=write_fd, new_session=True)
        finally:
            os.close(write_fd)
        self.started = time.monotonic()
        log.info("qemu started", pid=self.pid, log=str(self.log_path))
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()
        return self

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as stream, open(self.log_path, "w") as out:
            out.write("# " + " ".join(self.argv) + "\n")
            for raw in stream:
                text = raw.decode(errors="replace").rstrip("\r\n")
                now = time.monotonic() - self.started
                line = f"[{now:8.3f}] {text}"
                out.write(line + "\n")
                out.flush()
                if self.echo is not None:
                    with contextlib.suppress(OSError, ValueError):
                        print(line, file=self.echo, flush=True)
                with self._cond:
                    self.lines.append((now, text))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def running(self) -> bool:
        if self.pid is None or self.status is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.status = os.waitstatus_to_exitcode(status)
        return False

    def find(self, pattern: str, start: int = 0) -> int | None:
        """Index of the first console line from ``start`` on that matches, or None."""
        rx = re.compile(pattern)
        with self._cond:
            for i in range(start, len(self.lines)):
                if rx.search(self.lines[i][1]):
                    return i
        return None

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> int:
        """Wait until a console line matches; return its index.

        Raises DeviceError on timeout or when QEMU ends first.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            with self._cond:
                for i in range(seen, len(self.lines)):
                    if rx.search(self.lines[i][1]):
                        return i
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeviceError(f"console: no {pattern!r} within {timeout:g}s "
                                      f"(log {self.log_path})")  # fmt: skip
                self._cond.wait(min(left, 0.5))
            reader_done = self._reader is None or not self._reader.is_alive()
            if not self.running() and reader_done and self.find(pattern, seen) is None:
                raise DeviceError(f"qemu exited ({self.status}) before {pattern!r} "
                                  f"(log {self.log_path})")  # fmt: skip

    def stop(self, grace: float = 5.0) -> int | None:
        """Terminate our QEMU (SIGTERM, then SIGKILL) and reap it; its exit code."""
        if self.pid is not None and self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                _, status = os.waitpid(self.pid, 0)
                self.status = os.waitstatus_to_exitcode(status)
        if self._reader is not None:
            self._reader.join(5)
        return self.status

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()


class _Stop(Exception):
    """SIGTERM or SIGHUP reached ``pvpy qemu run``: stop our QEMU, then end."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signal(signum: int, _frame: object) -> None:
    raise _Stop(signum)


def run(image: Path, port: int | None, timeout: float | None, until: str | None,
        log_path: Path | None, quiet: bool = False, no_reboot: bool = False) -> int:  # fmt: skip
    """``pvpy qemu run``: 0 when QEMU ended by itself (or ``until`` matched), 124 on
    timeout, 130 on Ctrl-C, 128+N on SIGTERM/SIGHUP. QEMU runs in its own session
    (a Ctrl-C meant for us must not kill it half way), so whatever ends us stops
    it first: Python's default for SIGTERM would leave it running, orphaned."""
    machine = Machine(image, port, log_path, None if quiet else sys.stdout, no_reboot)
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        machine.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while machine.running():
            if until is not None and machine.find(until) is not None:
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"pvpy: timeout after {timeout:g}s; stopping qemu", file=sys.stderr)
                return 124
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 130
    except _Stop as e:
        print(f"pvpy: {signal.Signals(e.signum).name}; stopping qemu", file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig in previous:  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        try:
            machine.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return machine.status or 0
