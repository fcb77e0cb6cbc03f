"""A boot environment in a plain file (the sandbox's bootloader).

``key=value`` lines, replaced atomically (temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pvpy import bootvars
from pvpy.errors import BootEnvError, StoreError
from pvpy.store import write_atomic


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
