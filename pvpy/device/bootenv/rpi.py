"""Raspberry Pi tryboot: pvpy's variables on the firmware's A/B boot partitions.

The Pi firmware reads no boot script, so the variables cannot live in a
bootloader environment. It reads ``autoboot.txt`` (at most 512 bytes) on the
first FAT partition::

    [all]
    tryboot_a_b=1
    boot_partition=2      <- the committed partition: every normal boot
    [tryboot]
    boot_partition=3      <- booted once after ``reboot "0 tryboot"``

The tryboot flag is one-shot: the firmware clears it before it boots, so a
crash, a watchdog reset or a plain reboot of an uncommitted try lands on the
committed partition again. That is the rollback; nothing has to be written for it.

Our variables (pv_rev, pv_try, pv_trying, pv_bootcount) live next to it in
``pvpy.env`` (``key=value`` lines, replaced with write_atomic), together with
``rpi_boot_partition``: the partition that holds pv_rev's boot files. The
try partition is always the other one of ``partitions``. ``autoboot.txt`` is
derived from ``pvpy.env`` and rewritten only when the committed partition moves:
when pv_rev becomes the pv_try that the firmware just try-booted
(``/proc/device-tree/chosen/bootloader/tryboot`` is 1), or by
``commit_partition``. ``pvpy.env`` is written first: a power cut between the two
files leaves pv_rev committed and autoboot.txt one boot behind, and ``read()``
and ``write()`` rewrite a stale autoboot.txt. The other order would boot the
new partition with the try still pending, which pvpy would count as a failed try.
We own autoboot.txt: other settings in it are not kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from pvpy import bootvars
from pvpy.device.bootenv import BootChoice
from pvpy.device.bootenv.file import FileBootEnv
from pvpy.errors import BootEnvError, StoreError
from pvpy.rpiboot import AUTOBOOT, ENV_FILE, PARTITION, autoboot_text, parse_autoboot_partition
from pvpy.store import write_atomic

DT_BOOTLOADER = Path("/proc/device-tree/chosen/bootloader")
TRYBOOT_ARGUMENT = "0 tryboot"  # reboot(2) argument: default partition, tryboot flag
NOT_TRYBOOTED = (
    "the firmware did not try-boot: this kernel cannot pass the tryboot flag "
    '(reboot "0 tryboot" needs the Raspberry Pi kernel\'s firmware driver), '
    "or the power went before the reboot"
)


def _dt_int(path: Path) -> int | None:
    """A device-tree integer property: one 32-bit big-endian cell."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


class RpiTryboot:
    """Boot environment of a Raspberry Pi whose A/B boot partitions the firmware picks.

    ``boot_dir`` is the mounted first FAT partition (where autoboot.txt is read),
    ``partitions`` the A/B pair, ``dt_bootloader`` the firmware's device-tree node
    (``tryboot`` and ``partition`` properties; a parameter so tests can fake it).
    """

    name = "rpi"

    def __init__(
        self,
        boot_dir: Path,
        *,
        partitions: tuple[int, int] = (2, 3),
        dt_bootloader: Path = DT_BOOTLOADER,
    ) -> None:
        if len(set(partitions)) != 2 or not all(1 <= p <= 4 for p in partitions):
            raise BootEnvError(f"rpi: need two MBR partitions 1-4, not {partitions}")
        self.boot_dir = Path(boot_dir)
        self.partitions = partitions
        self.dt_bootloader = Path(dt_bootloader)
        self._file = FileBootEnv(self.boot_dir / ENV_FILE)

    @property
    def autoboot_path(self) -> Path:
        return self.boot_dir / AUTOBOOT

    def other(self, partition: int) -> int:
        a, b = self.partitions
        return b if partition == a else a

    def committed_partition(self, values: Mapping[str, str] | None = None) -> int:
        """The partition holding pv_rev: from pvpy.env, else autoboot.txt, else the first."""
        values = self._read() if values is None else values
        stored = values.get(PARTITION, "")
        if stored.isdigit() and int(stored) in self.partitions:
            return int(stored)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found = parse_autoboot_partition(self.autoboot_path.read_text("utf-8"))
            if found is not None and found in self.partitions:
                return found
        return self.partitions[0]

    def booted_try(self, partition: int | None = None) -> bool:
        """Whether the firmware booted with the tryboot flag (from ``partition``, if given)."""
        if _dt_int(self.dt_bootloader / "tryboot") != 1:
            return False
        booted = _dt_int(self.dt_bootloader / "partition")
        # Older firmware may not say which partition; the flag alone must do then.
        return partition is None or booted is None or booted == partition

    def choose(self) -> BootChoice:
        """What the firmware booted, in pvpy's terms (U-Boot boards get it from boot.cmd).

        A pending pv_try is being tried only when the firmware says it booted the
        try partition with the one-shot tryboot flag; pv_trying is written then, so
        a try that dies before its commit is told apart on the next boot from one
        the firmware never booted (flag 0 while pv_trying is unset: the reboot did
        not carry the flag). Either way the committed revision boots. Raises
        BootEnvError.
        """
        values = self.read()
        boot = bootvars.BootVars.parse(values)
        rev, pending = boot.rev, boot.pending_try
        if rev is None:
            raise BootEnvError("rpi: pvpy.env has no pv_rev: provision the device first")
        if pending is None:
            return BootChoice(revision=rev, trying=False)
        if self.booted_try(self.other(self.committed_partition(values))):
            self.write({bootvars.TRYING: str(pending)})
            return BootChoice(revision=pending, trying=True)
        if boot.trying == pending:  # booted once and did not commit
            return BootChoice(revision=rev, trying=False, failed_try=pending)
        return BootChoice(revision=rev, trying=False, failed_try=pending, reason=NOT_TRYBOOTED)

    def try_reboot_argument(self) -> str | None:
        """The reboot(2) argument that boots the try partition once."""
        return TRYBOOT_ARGUMENT

    def writes_try_partition(self) -> bool:
        return True  # the firmware boots kernel and initrd from the try boot partition

    def read(self) -> dict[str, str]:
        values = self._read()
        # Heal a power cut between pvpy.env and autoboot.txt (once pvpy owns
        # autoboot.txt, i.e. has written pvpy.env). Best effort: a boot partition
        # mounted read-only must not make the variables unreadable.
        if PARTITION in values:
            with contextlib.suppress(BootEnvError):
                self._sync_autoboot(self.committed_partition(values))
        return values

    def write(self, changes: Mapping[str, str | None]) -> None:
        if PARTITION in changes:
            raise BootEnvError(f"rpi: {PARTITION} is derived; use commit_partition()")
        old = self._read()
        partition = self.committed_partition(old)
        new_rev, old_try = changes.get(bootvars.REV, old.get(bootvars.REV)), old.get(bootvars.TRY)
        if new_rev is not None and new_rev != old.get(bootvars.REV) and new_rev == old_try:
            # The try's boot files are in the try partition: committing it moves
            # the default there, which is only safe once the firmware booted it.
            partition = self.other(partition)
            if not self.booted_try(partition):
                raise BootEnvError(
                    f"rpi: cannot commit revision {new_rev}: partition {partition} "
                    "was not booted with tryboot"
                )
        self._write({**changes, PARTITION: str(partition)})
        self._sync_autoboot(partition)

    def commit_partition(self, partition: int) -> None:
        """Make ``partition`` the default: swap autoboot.txt once its try booted."""
        if partition not in self.partitions:
            raise BootEnvError(f"rpi: partition {partition} is not one of {self.partitions}")
        if partition != self.committed_partition() and not self.booted_try(partition):
            raise BootEnvError(f"rpi: partition {partition} was not booted with tryboot")
        self._write({PARTITION: str(partition)})
        self._sync_autoboot(partition)

    def _read(self) -> dict[str, str]:
        try:
            return self._file.read()
        except BootEnvError as e:
            raise BootEnvError(f"rpi: {e}") from e

    def _write(self, changes: Mapping[str, str | None]) -> None:
        try:
            self._file.write(changes)
        except BootEnvError as e:
            raise BootEnvError(f"rpi: {e}") from e

    def _sync_autoboot(self, committed: int) -> None:
        text = autoboot_text(committed, self.other(committed))
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if self.autoboot_path.read_text("utf-8") == text:
                return  # unchanged: do not rewrite the FAT partition for nothing
        try:
            write_atomic(self.autoboot_path, text.encode())
        except StoreError as e:
            raise BootEnvError(f"rpi: {e}") from e
