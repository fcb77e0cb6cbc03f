"""Boot environments: where the bootloader and pvpy agree which revision boots.

The variables (``pv_rev``, ``pv_try``, ``pv_trying``, ``pv_bootcount``) and
their parsing are named once, in ``pvpy.bootvars``.

Every backend writes all changed variables in one atomic batch: chained
single writes can brick a device on power loss (SWUpdate's warning about
chained fw_setenv). Backends, one module each behind
the ``BootEnv`` protocol: ``file`` (the sandbox), ``uboot``, ``uboot-fat`` (U-Boot's
``uboot.env`` on a Raspberry Pi's FAT partition, with the committed revision beside it),
``grub`` and ``rpi`` (Raspberry Pi tryboot); ``open_bootenv`` picks one from its spec.
"""

from __future__ import annotations

from pvpy import bootvars
from pvpy._record import Record
from pvpy.errors import BootEnvError

__all__ = ["BootChoice", "BootEnv", "BootEnvError", "choose_boot", "open_bootenv"]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from pvpy.device.bootenv._protocol import BootEnv


def __getattr__(name: str) -> object:
    # BootEnv on demand: a Protocol needs typing, which PID 1 does without.
    if name == "BootEnv":
        from pvpy.device.bootenv._protocol import BootEnv

        return BootEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BootChoice(Record):
    """What the bootloader decided: the revision to boot and whether it is a try."""

    revision: int
    trying: bool
    failed_try: int | None = None  # a try that did not commit before this boot
    reason: str | None = None  # why failed_try failed, when the boot env knows better


def choose_boot(env: BootEnv, max_tries: int = 1) -> BootChoice:
    """Do what the device's boot script does, for boot envs no bootloader reads.

    A try revision is booted at most ``max_tries`` times; when it has not
    committed by then, boot the last good revision and report the failed try.
    """
    boot = bootvars.BootVars.parse(env.read())
    if boot.rev is None:
        raise BootEnvError("boot environment has no pv_rev: provision the device first")
    trying = boot.pending_try
    if trying is None:
        return BootChoice(revision=boot.rev, trying=False)
    if boot.bootcount >= max_tries:
        return BootChoice(revision=boot.rev, trying=False, failed_try=trying)
    env.write({bootvars.TRYING: str(trying), bootvars.BOOTCOUNT: str(boot.bootcount + 1)})
    return BootChoice(revision=trying, trying=True)


def open_bootenv(spec: str) -> BootEnv:
    """A backend from its spec: ``file:PATH``, ``uboot:PATH[,REDUNDANT_PATH]``,
    ``uboot-fat:FAT_DIR``, ``grub:PATH`` or ``rpi:BOOT_DIR``. Raises BootEnvError."""
    from pathlib import Path

    kind, _, where = spec.partition(":")
    if not where:
        raise BootEnvError(f"boot environment {spec!r}: expected KIND:PATH")
    if kind == "file":
        from pvpy.device.bootenv.file import FileBootEnv

        return FileBootEnv(Path(where))
    if kind == "uboot":
        from pvpy.device.bootenv.uboot import UBootEnv

        first, _, second = where.partition(",")
        return UBootEnv(Path(first), redundant_path=Path(second) if second else None)
    if kind == "uboot-fat":
        from pvpy.device.bootenv.ubootfat import UBootFatEnv

        return UBootFatEnv(Path(where))
    if kind == "grub":
        from pvpy.device.bootenv.grub import GrubEnv

        return GrubEnv(Path(where))
    if kind == "rpi":
        from pvpy.device.bootenv.rpi import RpiTryboot

        return RpiTryboot(Path(where))
    raise BootEnvError(
        f"unknown boot environment kind {kind!r} (file, uboot, uboot-fat, grub, rpi)"
    )
