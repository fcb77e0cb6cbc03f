"""What the update applier (``pvpy.device.apply.Applier``) may read and do in PID 1.

Its own module because a ``Protocol`` needs ``typing`` at run time, and PID 1
does without it (~0.6 MiB): ``pvpy.device.apply`` imports this only under
``TYPE_CHECKING``. PID 1's ``pvpy.device.pid1.process.Pid1`` implements it; the
Raspberry Pi tests (tests/test_rpiboot.py) have a stand-in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pvpy.device.bootenv._protocol import BootEnv
from pvpy.device.supervisor import Supervisor

Done = Callable[[int, str | None], None]  # (revision, problem or None when good)


class ApplyHost(Protocol):
    """PID 1 as an update sees it (a protocol: implementations do not inherit from it)."""

    @property
    def storage(self) -> Path: ...

    @property
    def bootenv(self) -> BootEnv:
        """Open once the boot started (RuntimeError before)."""
        ...

    @property
    def supervisor(self) -> Supervisor | None:
        """The running revision's supervisor (None: no revision runs)."""
        ...

    # -- the boot facts: what the bootloader chose, and what failed before this boot --

    @property
    def boot_revision(self) -> int | None: ...

    @property
    def boot_trying(self) -> bool:
        """``boot_revision`` is a try, on trial until it commits."""
        ...

    @property
    def failed_try(self) -> int | None:
        """A try that did not commit before this boot."""
        ...

    @property
    def failed_try_reason(self) -> str | None:
        """Why ``failed_try`` failed, when the boot env knows better than "did not commit"."""
        ...

    @property
    def commit_delay(self) -> float:
        """Seconds every goal must hold before an update commits."""
        ...

    @property
    def commit_timeout(self) -> float:
        """Seconds an update may take to meet its goals."""
        ...

    @property
    def shutdown_pending(self) -> bool: ...

    @property
    def revision(self) -> int | None:
        """The revision running (None: none)."""
        ...

    def set_revision(self, revision: int) -> None:
        """An update committed: ``revision`` is the one running now."""
        ...

    def start_verify(self, revision: int, done: Done) -> None:
        """Verify an installed revision in a child; ``done`` from PID 1's loop."""
        ...

    def start_write_boot(self, revision: int, done: Done) -> None:
        """Write the revision's boot files into the try boot partition (the Pi), in a
        child; ``done`` from PID 1's loop."""
        ...

    def request(self, action: str, reason: str, argument: str | None = None) -> None:
        """Stop everything, then reboot/halt/power off (``argument``: reboot(2)'s)."""
        ...
