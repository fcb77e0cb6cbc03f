"""U-Boot's environment in a file on a FAT partition, with the committed revision beside it.

The Raspberry Pi boards boot Debian's U-Boot (``u-boot-rpi``: CONFIG_ENV_IS_IN_FAT,
``uboot.env`` on mmc 0:1, 16 KiB, one copy, no redundant copy, no BOOTCOUNT_LIMIT).
U-Boot reads ``uboot.env`` at every boot and rewrites it in place with ``saveenv``
when it marks a try (``pv_trying``, boards/qemu-arm64/boot.cmd); PID 1 reads and
writes it with the ``uboot`` backend (``UBootEnv``: temp file, fsync, rename).

A power cut while U-Boot writes can tear it: its CRC fails, and U-Boot boots on its
built-in default environment, which knows no ``pv_rev``. So the committed revision
is kept twice: in ``uboot.env`` (the truth while its CRC is good) and in
``pvrev.env`` beside it, which only pvpy writes (temp file and rename, never torn).
The boot script takes ``pv_rev`` from ``pvrev.env`` when the environment has none
and boots it; a pending try is forgotten then, and PID 1's reconciliation reports it
ERROR. ``read()`` here does the same: on a torn (or missing) ``uboot.env`` it returns
U-Boot's defaults (``u-boot-initial-env``, written by the image build) with
``pv_rev`` from ``pvrev.env``; the next ``write()`` starts a good ``uboot.env`` from them.

Order of a write: ``uboot.env`` first, then ``pvrev.env`` whenever its ``pv_rev``
differs from the environment's new one. So ``pvrev.env`` only ever names a revision
that ``uboot.env`` committed (the new one, or the one before during a commit), never
a try. Without ``u-boot-initial-env`` a torn ``uboot.env`` is not rewritten: an
environment of pvpy's variables alone would replace U-Boot's built-in one, bootcmd
included.

Standard library only (PID 1 runs it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pvpy import bootvars
from pvpy.device.bootenv.uboot import LOCKFILE, UBootEnv, load_defaults
from pvpy.errors import BootEnvError, StoreError
from pvpy.rpiboot import COMMITTED, UBOOT_DEFAULTS, UBOOT_ENV, UBOOT_ENV_SIZE, committed_text
from pvpy.store import write_atomic


class UBootFatEnv:
    """``uboot.env`` and ``pvrev.env`` in ``directory`` (the mounted FAT partition)."""

    name = "uboot-fat"

    def __init__(
        self, directory: Path, size: int = UBOOT_ENV_SIZE, lockfile: Path | None = LOCKFILE,
    ) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.committed_path = self.directory / COMMITTED
        self.defaults_path = self.directory / UBOOT_DEFAULTS
        self.env = UBootEnv(self.directory / UBOOT_ENV, size, lockfile=lockfile)

    @property
    def was_corrupt(self) -> bool:
        """Whether the last read or write found no good uboot.env (torn or missing)."""
        return self.env.was_corrupt

    def try_reboot_argument(self) -> str | None:
        return None  # a plain restart: U-Boot reads pv_try

    def writes_try_partition(self) -> bool:
        return False  # the boot script loads kernel and initrd from the trail

    def fw_env_config(self) -> str:
        """The ``/etc/fw_env.config`` line that makes fw_printenv see ``uboot.env``."""
        return self.env.fw_env_config()

    def committed(self) -> int | None:
        """``pvrev.env``'s revision (None: missing or unreadable)."""
        try:
            text = self.committed_path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return bootvars.parse_revision(bootvars.parse(text).get(bootvars.REV))

    def read(self) -> dict[str, str]:
        if not self.env.path.exists():  # U-Boot: "Unable to read uboot.env": its defaults
            self.env.was_corrupt = True
            return self._fallback(must_have_defaults=False) or {}
        self.env.defaults = self._fallback(must_have_defaults=False)
        return self.env.read()

    def write(self, changes: Mapping[str, str | None]) -> None:
        before = self.read()
        if not self.env.path.exists():  # a torn file U-Boot could not even find
            self._replace(self.env.path, bytes(self.env.size))
        self.env.defaults = self._fallback(must_have_defaults=True)
        self.env.write(changes)
        rev = changes[bootvars.REV] if bootvars.REV in changes else before.get(bootvars.REV)
        revision = bootvars.parse_revision(rev)
        if revision is not None and revision != self.committed():
            self._replace(self.committed_path, committed_text(revision).encode())

    def _fallback(self, must_have_defaults: bool) -> dict[str, str] | None:
        """What U-Boot runs on when uboot.env is torn: its defaults, pv_rev from pvrev.env.

        None when the defaults file is missing and ``must_have_defaults`` (a write
        then refuses, see the module docstring); a read gets pv_rev alone.
        """
        try:
            values = load_defaults(self.defaults_path)
        except BootEnvError:
            if must_have_defaults:
                return None
            values = {}
        committed = self.committed()
        if committed is not None:
            values[bootvars.REV] = str(committed)
        return values

    @staticmethod
    def _replace(path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except StoreError as e:
            raise BootEnvError(f"uboot-fat: {e}") from e
