"""The interface every boot environment backend offers (``pvpy.bootenv.BootEnv``).

Its own module because a ``Protocol`` needs ``typing`` at run time, and PID 1,
which opens a boot environment, does without it (~0.6 MiB): ``pvpy.bootenv``
loads this only when someone asks for ``BootEnv``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class BootEnv(Protocol):
    """What every backend offers (a protocol: they do not inherit from it)."""

    name: str

    def read(self) -> dict[str, str]:
        """All variables. Raises BootEnvError."""
        ...

    def write(self, changes: Mapping[str, str | None]) -> None:
        """Set (str) or unset (None) variables in one atomic batch. Raises BootEnvError."""
        ...
