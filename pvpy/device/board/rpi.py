"""Raspberry Pi board mode: the config partition's boot env, the boot choice, and
writing the try boot partition.

Two ways a Pi boots (board.json's ``rpi.boot``): ``u-boot`` (the default of
boards/rpi3 and boards/rpi4): the first FAT partition holds U-Boot's ``uboot.env``
and the committed revision (``pvpy.device.bootenv.ubootfat``); U-Boot's boot script
chooses the revision and says so on the kernel command line, as on qemu-arm64. Or
``tryboot`` (boards/rpi4-tryboot, boards/rpi5, for the Raspberry Pi kernel): the
firmware's A/B boot partitions, described below.

On the device the update child (``pvpy device write-boot``, never PID 1) writes
the revision that is to be try-booted into the *other* boot partition with
``write_boot_partition`` (the files ``pvpy.rpiboot.boot_files`` lays out, as the
image build does).

Why this is crash-safe: the partition written is the one the firmware boots
only with the one-shot tryboot flag, and PID 1 sets ``pv_try`` and asks for
that flag only after this returned (files fsynced, partition unmounted).
``config.txt`` goes first and comes back last: a partition cut half way has
none, which the Pi 5 firmware does not even count as bootable, and the
committed partition and autoboot.txt are never touched here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from pvpy import bootvars
from pvpy.device import _linux
from pvpy.device.board import BoardConfig, BootArgs
from pvpy.errors import BootEnvError, DeviceError
from pvpy.log import get_logger
from pvpy.rpiboot import CMDLINE, CONFIG
from pvpy.store import fsync_dir

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

log = get_logger("board")

_CHUNK = 1 << 20


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


RPI_CONFIG_DIR = "/run/pvpy-config"  # where PID 1 mounts the config partition (autoboot.txt)
UBOOT = "u-boot"  # board.json rpi.boot: U-Boot's environment on the config partition
RPI_BOOT_DIR = "/run/pvpy-boot"  # where the update child mounts the try boot partition


def open_rpi_bootenv(
    config: BoardConfig, storage_device: str, mountpoint: str, dt_bootloader: Path | None = None,
) -> Any:  # fmt: skip
    """Mount the Pi's config partition (vfat, beside the storage on the same disk)
    on ``mountpoint`` and return its boot environment: ``UBootFatEnv`` on a U-Boot
    board, else ``pvpy.device.bootenv.rpi.RpiTryboot``.

    ``storage_device`` may be a directory with ``p<N>`` directories beside it
    standing in for the partitions (tests): nothing is mounted then, and
    ``dt_bootloader`` stands in for the firmware's device-tree node.
    Raises DeviceError.
    """
    number = int(config.rpi.get("config_partition", 1))
    device = partition_device(storage_device, number)
    if device is None:
        raise DeviceError(f"rpi: no partition {number} beside the storage {storage_device}")
    where = device
    if not os.path.isdir(device):
        os.makedirs(mountpoint, exist_ok=True)
        try:
            _linux.mount(device, mountpoint, "vfat",
                         _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC)  # fmt: skip
        except OSError as e:
            raise DeviceError(f"rpi: config partition {device}: {e}") from e
        where = mountpoint
        log.info("config partition mounted", device=device, target=mountpoint)
    if config.rpi.get("boot") == UBOOT:
        from pvpy.device.bootenv.ubootfat import UBootFatEnv

        _remove_temp_files(Path(where))
        return UBootFatEnv(Path(where))
    from pvpy.device.bootenv.rpi import RpiTryboot

    boot = tuple(int(p) for p in config.rpi.get("boot_partitions", (2, 3)))
    if dt_bootloader is None:
        return RpiTryboot(Path(where), partitions=(boot[0], boot[1]))
    return RpiTryboot(Path(where), partitions=(boot[0], boot[1]), dt_bootloader=dt_bootloader)


def _remove_temp_files(directory: Path) -> None:
    """Temp files a power cut left in the FAT root (``write_atomic``'s ``.NAME.*.tmp``)."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if entry.startswith(".") and entry.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    (directory / entry).unlink()


def rpi_boot_choice(env: Any, cmdline: BootArgs) -> tuple[BootArgs, str | None]:
    """The boot choice and, when the boot env knows, why a failed try failed.

    U-Boot chose already and said so on the command line (``pv_rev``,
    ``pv_trying``, ``pv_failed_try``), as on qemu-arm64: that stands. Tryboot:
    ``RpiTryboot.choose`` as BootArgs, checked against the booted partition's
    cmdline.txt (``pv_rev``: whose files the firmware loaded). Raises BootEnvError.

    A try whose partition holds another revision's files is not tested: it
    fails, and the committed revision runs.
    """
    from pvpy.device.bootenv.rpi import RpiTryboot

    if not isinstance(env, RpiTryboot):
        return cmdline, None
    choice = env.choose()
    revision, trying, failed, reason = choice.revision, choice.trying, choice.failed_try, \
        choice.reason  # fmt: skip
    booted = cmdline.revision
    if booted is not None and booted != revision:
        if trying:
            committed = bootvars.BootVars.parse(env.read()).rev
            if committed is None:  # choose() has just read it: only another writer drops it
                raise BootEnvError("rpi: pvpy.env has no pv_rev: provision the device first")
            reason = (f"the try boot partition holds revision {booted}'s boot files, "
                      f"not {revision}'s")  # fmt: skip
            log.error("try partition mismatch; running the committed revision",
                      booted=booted, trying=revision)  # fmt: skip
            revision, trying, failed = committed, False, choice.revision
        else:
            log.warning("the booted partition holds another revision's boot files",
                        booted=booted, revision=revision)  # fmt: skip
    return BootArgs(revision=revision, trying=trying, failed_try=failed,
                    storage=cmdline.storage), reason  # fmt: skip


def rpi_try_partition(config: BoardConfig, env: Any, storage_device: str) -> str | None:
    """The device (or stand-in directory) of the boot partition a try goes to:
    the one autoboot.txt's ``[tryboot]`` names, never the committed one."""
    return partition_device(storage_device, env.other(env.committed_partition()))
