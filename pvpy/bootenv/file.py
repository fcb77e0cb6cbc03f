"""A boot environment in a plain file (the sandbox's bootloader).

``key=value`` lines, replaced atomically (temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pvpy.errors import BootEnvError, StoreError
from pvpy.store import write_atomic


class FileBootEnv:
    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, str]:
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise BootEnvError(f"file: cannot read {self.path}: {e}") from e
        values = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                values[key.strip()] = value.strip()
        return values

    def write(self, changes: Mapping[str, str | None]) -> None:
        values = self.read()
        for key, value in changes.items():
            if "=" in key or "\n" in key or (value is not None and "\n" in value):
                raise BootEnvError(f"file: invalid variable {key!r}")
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        text = "".join(f"{k}={v}\n" for k, v in sorted(values.items()))
        try:
            write_atomic(self.path, text.encode())
        except StoreError as e:
            raise BootEnvError(f"file: {e}") from e
