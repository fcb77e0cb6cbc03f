"""A boot environment in a plain file (the sandbox's bootloader).

``key=value`` lines, replaced atomically (temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path

from pvpy import bootvars
from pvpy.device import _linux
from pvpy.errors import BootEnvError, StoreError
from pvpy.log import get_logger
from pvpy.store import write_atomic

log = get_logger("bootenv")


class FileBootEnv:
    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def try_reboot_argument(self) -> str | None:
        return None  # a plain restart: the bootloader reads pv_try

    def writes_try_partition(self) -> bool:
        return False  # the bootloader loads kernel and initrd from the trail

    def read(self) -> dict[str, str]:
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise BootEnvError(f"file: cannot read {self.path}: {e}") from e
        return bootvars.parse(text)

    def write(self, changes: Mapping[str, str | None]) -> None:
        values = self.read()
        for key, value in changes.items():
            if "=" in key or "\n" in key or (value is not None and "\n" in value):
                raise BootEnvError(f"file: invalid variable {key!r}")
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        try:
            write_atomic(self.path, bootvars.render(values).encode())
        except StoreError as e:
            raise BootEnvError(f"file: {e}") from e
        checkpoint(self.path.parent)


def checkpoint(directory: Path) -> None:
    """Make what is written so far visible to a bootloader reading ext4 without
    replaying its journal (U-Boot): after a power cut it would otherwise see the
    old directory entry of this file, or an inode freed and reused since (found
    by the QEMU soak: a cut seconds after a commit booted the old revision). The
    objects and trail of a try were written before its pv_try: this carries
    them too. Not ext4 (the sandbox on tmpfs or overlay): nothing to do."""
    try:
        _linux.ext4_checkpoint(str(directory))
    except OSError as e:
        if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            # written and durable for Linux: say so, do not fail the write
            log.warning("journal checkpoint failed", directory=str(directory), error=str(e))
