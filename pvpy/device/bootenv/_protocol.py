"""The interface every boot environment backend offers (``pvpy.device.bootenv.BootEnv``).

Its own module because a ``Protocol`` needs ``typing`` at run time, and PID 1,
which opens a boot environment, does without it (~0.6 MiB): ``pvpy.device.bootenv``
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

    def try_reboot_argument(self) -> str | None:
        """The reboot(2) RESTART2 argument that boots a try (the Pi's "0 tryboot"),
        or None: a plain restart, the bootloader reads ``pv_try`` itself."""
        ...

    def writes_try_partition(self) -> bool:
        """Whether a try needs the revision's boot files written into a boot
        partition first (the Pi's A/B boot partitions), rather than the bootloader
        loading them from the storage's trail."""
        ...
