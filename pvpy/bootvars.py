"""Boot variables: where the bootloader and pvpy agree which revision boots.

Pantavisor's names, so boot scripts read alike::

    pv_rev        the last good (committed) revision
    pv_try        a revision to try once, not yet committed
    pv_trying     set by the bootloader when it boots pv_try; if it is still
                  equal to pv_try on the next boot, that try failed
    pv_bootcount  boots of the try revision so far (boot counting)

Shared: the device's boot environment backends (``pvpy.device.bootenv``) read
and write them; provisioning and image building write the first ones. The
``key=value`` line format of the file backends (the storage's ``bootenv``, the
Pi's ``pvpy.env``) is parsed and rendered here only.

Standard library only (PID 1 reads boot variables).
"""

from __future__ import annotations

from collections.abc import Mapping

from pvpy._record import Record

REV = "pv_rev"
TRY = "pv_try"
TRYING = "pv_trying"
BOOTCOUNT = "pv_bootcount"


def parse_revision(value: str | None) -> int | None:
    """A revision number (or a count), or None for anything else (ASCII digits only)."""
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


class BootVars(Record):
    """The boot variables, typed: parsed from a backend's ``read()`` in one place."""

    rev: int | None = None  # committed
    try_rev: int | None = None  # to try once, not committed
    trying: int | None = None  # the bootloader booted this try (set on boot, pre-commit)
    bootcount: int = 0  # boots of the try so far

    @classmethod
    def parse(cls, values: Mapping[str, str]) -> BootVars:
        return cls(
            rev=parse_revision(values.get(REV)),
            try_rev=parse_revision(values.get(TRY)),
            trying=parse_revision(values.get(TRYING)),
            bootcount=parse_revision(values.get(BOOTCOUNT)) or 0,
        )

    @property
    def pending_try(self) -> int | None:
        """A try that is set and is not the committed revision itself."""
        return self.try_rev if self.try_rev is not None and self.try_rev != self.rev else None


# The write batches of an update, each one atomic write of the backend.


def start_try(revision: int) -> dict[str, str | None]:
    """Ask the bootloader to boot ``revision`` once (count from zero)."""
    return {TRY: str(revision), TRYING: None, BOOTCOUNT: "0"}


def commit(revision: int) -> dict[str, str | None]:
    """``revision`` is the last good one; no try pending."""
    return {REV: str(revision), TRY: None, TRYING: None, BOOTCOUNT: None}


def clear_try() -> dict[str, str | None]:
    """The try is over (failed or abandoned); the committed revision stays."""
    return {TRY: None, TRYING: None, BOOTCOUNT: None}


def parse(text: str) -> dict[str, str]:
    """``key=value`` lines; lines without ``=`` or a key are ignored."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


def render(values: Mapping[str, str]) -> str:
    """``key=value`` lines, sorted: the same values always give the same bytes."""
    return "".join(f"{k}={v}\n" for k, v in sorted(values.items()))
