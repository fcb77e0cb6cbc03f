"""Raspberry Pi boot partitions: what one holds for a revision, and writing the try one.

Shared by both sides, so the factory image and an update lay a partition out
alike: ``pvpy image build`` fills boot A and B of a new image with
``boot_files`` (through mtools), and on the device the update child
(``pvpy device write-boot``, never PID 1) writes the revision that is to be
try-booted into the *other* boot partition with ``write_boot_partition``.

Why this is crash-safe: the partition written is the one the firmware boots
only with the one-shot tryboot flag, and PID 1 sets ``pv_try`` and asks for
that flag only after this returned (files fsynced, partition unmounted).
``config.txt`` goes first and comes back last: a partition cut half way has
none, which the Pi 5 firmware does not even count as bootable, and the
committed partition and autoboot.txt are never touched here.

Standard library only (the device side runs it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pvpy.errors import DeviceError
from pvpy.store import fsync_dir

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "CMDLINE", "CONFIG", "INITRD", "KERNEL", "boot_files", "cmdline_txt", "config_txt",
    "partition_device", "write_boot_partition",
]  # fmt: skip

KERNEL = "vmlinuz"  # names in a boot partition (config.txt points at them)
INITRD = "initrd.img"
CONFIG = "config.txt"
CMDLINE = "cmdline.txt"
_CHUNK = 1 << 20


def config_txt(settings: Sequence[str], revision: int, dtb_name: str | None) -> str:
    """config.txt of a boot partition: the board's settings, then our file names."""
    lines = [f"# pvpy: boot files of revision {revision} (pvpy writes this partition)"]
    lines += [str(line) for line in settings]
    lines += [f"kernel={KERNEL}", f"initramfs {INITRD} followkernel"]
    if dtb_name:
        lines.append(f"device_tree={dtb_name}")
    return "\n".join(lines) + "\n"


def cmdline_txt(console: str, cmdline: str, revision: int) -> str:
    """cmdline.txt (one line): the console, the revision's command line, ``pv_rev``.

    ``pv_rev`` names the revision whose files this partition holds; PID 1 checks
    it against the boot choice (pvpy.board.boot_choice reads it).
    """
    words = [f"console={console}", *cmdline.split(), f"pv_rev={revision}"]
    return " ".join(words) + "\n"


def boot_files(
    state: Mapping[str, Any], objects: Path, settings: Sequence[str], console: str,
    dtb_name: str | None,
) -> dict[str, Path | bytes]:  # fmt: skip
    """What a boot partition holds for ``state`` (a decoded state.json) besides the
    firmware: the BSP's kernel, initrd and device tree objects (files under
    ``objects``) under fixed names, config.txt and cmdline.txt. ``dtb_name`` is
    the name the firmware looks for (used only when the BSP has a device tree).
    Raises DeviceError when the BSP lacks a kernel or initrd.
    """
    revision, bsp = int(state["revision"]), state.get("bsp") or {}
    files: dict[str, Path | bytes] = {}
    for key, name in (("kernel", KERNEL), ("initrd", INITRD)):
        if not isinstance(bsp.get(key), dict):
            raise DeviceError(f"revision {revision}: no bsp.{key} for the boot partition")
        files[name] = Path(objects) / str(bsp[key]["sha256"])
    dtb = dtb_name if isinstance(bsp.get("dtb"), dict) and dtb_name else None
    if dtb:
        files[dtb] = Path(objects) / str(bsp["dtb"]["sha256"])
    files[CONFIG] = config_txt(settings, revision, dtb).encode()
    files[CMDLINE] = cmdline_txt(console, str(bsp.get("cmdline", "")), revision).encode()
    return files


def _write_file(path: Path, content: Path | bytes) -> None:
    """``content`` to ``path`` through a temp file: fsync, rename, fsync the dir.

    A file from the object store is hashed while it is copied (its name is its
    sha256): a corrupt object must not become a kernel.
    """
    import hashlib

    tmp = path.with_name(f".{path.name}.tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        if isinstance(content, bytes):
            out.write(content)
        else:
            with open(content, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != content.name:
                raise DeviceError(f"object {content.name} is corrupt: not writing {path.name}")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_files(target: Path, files: Mapping[str, Path | bytes]) -> None:
    """Write ``files`` into the mounted partition ``target``. Other files stay
    (the firmware, which no revision carries); temp files of an earlier cut go.

    Order matters for a power cut: config.txt away first, back last (see the
    module docstring). Raises DeviceError (OSError as DeviceError).
    """
    target = Path(target)
    try:
        with contextlib.suppress(FileNotFoundError):
            (target / CONFIG).unlink()
            fsync_dir(target)
        for entry in os.listdir(target):
            if entry.startswith(".") and entry.endswith(".tmp"):
                (target / entry).unlink()
        for name in sorted(files, key=lambda n: (n in (CMDLINE, CONFIG), n == CONFIG, n)):
            _write_file(target / name, files[name])
        fsync_dir(target)
    except OSError as e:
        raise DeviceError(f"boot partition {target}: {e}") from e


def write_boot_partition(
    device: str, files: Mapping[str, Path | bytes], mountpoint: Path,
) -> None:  # fmt: skip
    """Mount the FAT boot partition ``device`` on ``mountpoint``, write ``files``
    (``write_files``), sync and unmount. ``device`` may be a directory instead (a
    stand-in for tests and the sandbox): written in place. Raises DeviceError.
    """
    from pvpy import _linux

    if Path(device).is_dir():
        write_files(Path(device), files)
        return
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        _linux.mount(device, str(mountpoint), "vfat", _linux.MS_NOSUID | _linux.MS_NODEV
                     | _linux.MS_NOEXEC)  # fmt: skip
    except OSError as e:
        raise DeviceError(f"boot partition {device}: {e}") from e
    try:
        write_files(mountpoint, files)
    finally:
        os.sync()
        try:
            _linux.umount(str(mountpoint))
        except OSError as e:
            raise DeviceError(f"boot partition {device}: {e}") from e


def partition_device(sibling: str, number: int) -> str | None:
    """The /dev node of partition ``number`` on the disk that holds ``sibling``
    (e.g. the storage's /dev/mmcblk0p4 -> /dev/mmcblk0p1), from sysfs. None when
    sysfs does not know it. A directory ``sibling`` (sandbox, tests) has its
    partitions beside it, named ``p<number>``."""
    if Path(sibling).is_dir():
        found = Path(sibling).parent / f"p{number}"
        return str(found) if found.exists() else None
    name = os.path.basename(os.path.realpath(sibling))
    try:
        disk = Path(os.path.realpath(f"/sys/class/block/{name}")).parent
        for entry in sorted(os.listdir(disk)):
            with contextlib.suppress(OSError):
                if (disk / entry / "partition").read_text().strip() == str(number):
                    return f"/dev/{entry}"
    except OSError:
        return None
    return None
