"""Board mode of ``pvpy init``: what PID 1 does on real hardware before it boots.

The image's /init runs ``python3 -m pvpy init --board /etc/pvpy/board.json``
(``pvpy.paths.BOARD_FILE``); the board file is written by ``pvpy image build`` from
``boards/<name>/board.yaml``. PID 1's board set-up (``pvpy.device.pid1``) then calls,
in order:

1. ``leave_rootfs`` (before anything else): make ``/`` a real mount, because
   pivot_root(2) — crun's and runc's — fails with EINVAL on the initramfs
   rootfs, which has no parent mount. switch_root's trick without copying;
2. ``load_modules``: the image's ``load.list`` through finit_module (no kmod);
3. ``mount_storage``: the storage partition, found by ``PARTLABEL=``,
   ``LABEL=`` or a /dev path (board file, overridden by ``pv_storage=`` on the
   kernel command line);
4. ``setup_network``: static address or busybox udhcpc, as the board says
   (QEMU user networking has no link to wait for);
5. ``boot_choice``: what the bootloader chose, from /proc/cmdline — the same
   facts the sandbox passes as --boot-revision/--trying/--failed-try.

Only the standard library: this runs in PID 1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from pvpy import bootvars, paths
from pvpy._record import Record
from pvpy.device import _linux
from pvpy.errors import CommandError, DeviceError
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

log = get_logger("board")

BOARD_FILE = paths.BOARD_FILE  # named once, in pvpy.paths
UDHCPC_SCRIPT = "udhcpc.script"  # beside this module, in the image too
_EXT_MAGIC_AT, _EXT_LABEL_AT = 1024 + 0x38, 1024 + 0x78

__all__ = ["BOARD_FILE", "BoardConfig", "BootArgs", "boot_choice", "leave_rootfs"]


class BoardConfig(Record):
    """The device side of a board description (``board.json`` in the image)."""

    name: str
    storage: str = "PARTLABEL=storage"
    storage_fstype: str = "ext4"
    storage_timeout: float = 10.0
    modules_on_demand: tuple[str, ...] = ()
    network: Mapping[str, str] = MappingProxyType({})  # mode: static|dhcp|none
    watchdog_timeout: float = 3.0  # seconds to wait for /dev/watchdog after the modules
    # Raspberry Pi tryboot (image.Board.device_config): config_partition, boot_partitions,
    # config_txt, console, dtb. Empty on boards whose bootloader reads the storage.
    rpi: Mapping[str, Any] = MappingProxyType({})

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BoardConfig:
        known = set(cls._fields)
        unknown = set(doc) - known
        if unknown:
            raise DeviceError(f"board file: unknown keys {sorted(unknown)}")
        values = dict(doc)
        if "modules_on_demand" in values:
            values["modules_on_demand"] = tuple(values["modules_on_demand"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "storage": self.storage,
            "storage_fstype": self.storage_fstype,
            "storage_timeout": self.storage_timeout,
            "modules_on_demand": list(self.modules_on_demand),
            "network": dict(self.network),
            "watchdog_timeout": self.watchdog_timeout,
            **({"rpi": dict(self.rpi)} if self.rpi else {}),
        }


def load(path: Path) -> BoardConfig:
    """Read a board file. Raises DeviceError."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DeviceError(f"board file {path}: {e}") from e
    if not isinstance(doc, dict):
        raise DeviceError(f"board file {path}: not a JSON object")
    return BoardConfig.from_dict(doc)


class BootArgs(Record):
    """The bootloader's choice as the kernel command line carries it."""

    revision: int | None
    trying: bool
    failed_try: int | None
    storage: str | None


def parse_cmdline(text: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        args[key] = value
    return args


def boot_choice(cmdline: str) -> BootArgs:
    """``pv_rev=N [pv_trying=1] [pv_failed_try=M] [pv_storage=DEV]`` (boards/*/boot.cmd)."""
    args = parse_cmdline(cmdline)
    return BootArgs(
        revision=bootvars.parse_revision(args.get(bootvars.REV)),
        trying=args.get(bootvars.TRYING) == "1",  # a flag here, not the revision
        failed_try=bootvars.parse_revision(args.get("pv_failed_try")),
        storage=args.get("pv_storage") or None,
    )


def leave_rootfs(scratch: str = "/newroot") -> None:
    """Bind ``/`` on ``scratch``, move that mount over ``/`` and chroot into it.

    Needed on the initramfs rootfs (it cannot be pivoted away from); on a
    root that is a real mount already it is harmless. Costs no copying.
    Raises OSError.
    """
    os.makedirs(scratch, exist_ok=True)
    _linux.mount("/", scratch, None, _linux.MS_BIND | _linux.MS_REC)
    os.chdir(scratch)
    _linux.mount(".", "/", None, _linux.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def load_modules(config: BoardConfig) -> list[str]:
    from pvpy.device.board.modules import load_listed

    start = time.monotonic()
    loaded = load_listed(Path("/lib/modules") / os.uname().release, config.modules_on_demand)
    log.info("modules loaded", count=len(loaded), seconds=round(time.monotonic() - start, 3))
    return loaded


def _ext_label(device: str) -> str | None:
    try:
        with open(device, "rb") as f:
            f.seek(_EXT_MAGIC_AT)
            if f.read(2) != b"\x53\xef":
                return None
            f.seek(_EXT_LABEL_AT)
            return f.read(16).rstrip(b"\0").decode(errors="replace")
    except OSError:
        return None


def find_device(spec: str) -> str | None:
    """``/dev/...``, ``PARTLABEL=name`` (GPT partition name) or ``LABEL=name`` (ext*)."""
    if spec.startswith("/dev/"):
        return spec if os.path.exists(spec) else None
    kind, _, want = spec.partition("=")
    try:
        blocks = sorted(os.listdir("/sys/class/block"))
    except OSError:
        return None
    for name in blocks:
        device = f"/dev/{name}"
        if kind == "PARTLABEL":
            try:
                uevent = Path(f"/sys/class/block/{name}/uevent").read_text().splitlines()
            except OSError:
                continue
            if f"PARTNAME={want}" in uevent and os.path.exists(device):
                return device
        elif kind == "LABEL" and _ext_label(device) == want:
            return device
    return None


def mount_storage(config: BoardConfig, target: Path, override: str | None) -> str:
    """Wait for the storage device and mount it on ``target``; return the device.

    Raises DeviceError when it does not appear in time or does not mount.
    """
    spec = override or config.storage
    deadline = time.monotonic() + config.storage_timeout
    while (device := find_device(spec)) is None:
        if time.monotonic() > deadline:
            raise DeviceError(f"storage {spec}: no such device after {config.storage_timeout}s")
        time.sleep(0.05)
    target.mkdir(parents=True, exist_ok=True)
    try:
        _linux.mount(device, str(target), config.storage_fstype, _linux.MS_NOSUID | _linux.MS_NODEV)
    except OSError as e:
        raise DeviceError(f"storage {spec}: {e}") from e
    log.info("storage mounted", device=device, target=str(target), spec=spec)
    return device


NETWORK_WAIT = 15.0  # seconds the board's interface may take to appear


def setup_network(config: BoardConfig) -> None:
    """Bring up lo and the board's interface: static address or DHCP (busybox)."""
    from pvpy import _run

    mode = config.network.get("mode", "none")
    iface = config.network.get("interface", "eth0")
    commands = [["ip", "link", "set", "lo", "up"]]
    # a USB Ethernet (a Pi 3's, QEMU raspi3b's usb-net) appears seconds into the boot
    if mode in ("static", "dhcp") and not wait_for(f"/sys/class/net/{iface}", NETWORK_WAIT):
        log.warning("no network interface", interface=iface, waited_s=NETWORK_WAIT)
    if mode == "static":
        commands += [
            ["ip", "link", "set", iface, "up"],
            ["ip", "addr", "add", config.network["address"], "dev", iface],
        ]
        if config.network.get("gateway"):
            commands.append(["ip", "route", "add", "default", "via", config.network["gateway"]])
    elif mode == "dhcp":
        # -n: give up when no lease comes; -q: quit once configured; -t 5 tries.
        # -s: our event script, shipped in the package (busybox udhcpc applies
        # no lease by itself, and the image has no /usr/share/udhcpc).
        script = Path(__file__).with_name(UDHCPC_SCRIPT)
        commands.append(["udhcpc", "-i", iface, "-n", "-q", "-t", "5", "-s", str(script)])
    for argv in commands:
        # A network that does not come up must not stop the boot (nor the boot
        # choice and watchdog that board_setup handles after this): log, go on.
        try:
            _run.call(argv, timeout=30)
        except CommandError as e:
            log.warning("network command failed", argv=argv, error=str(e))
    log.info("network configured", mode=mode, interface=iface,
             address=config.network.get("address"))  # fmt: skip


def wait_for(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
