"""Kernel modules without kmod: PID 1 loads the list the image ships.

The image build (``pvpy.workstation.image.modules.load_order``) writes the
board's modules, dependencies first, to ``lib/modules/<version>/`` as
``pvpy.paths.MODULES_LOAD_LIST``; ``load_listed`` loads them with
finit_module(2), in that order. There is no /sbin/modprobe for the kernel's
request_module either, so anything the kernel would ask for by itself (crc32c
for ext4) must be in the list.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from pvpy.errors import DeviceError
from pvpy.paths import MODULES_LOAD_LIST

__all__ = ["load_listed"]


def _name(module: str) -> str:
    """The kernel's name of a module: '-' and '_' are the same to it."""
    return module.replace("-", "_")


def load_listed(moddir: Path, skip: Iterable[str] = ()) -> list[str]:
    """Load every module of ``moddir``'s load list in order; return the names loaded.

    A module that is loaded already counts as loaded; one that fails is logged
    and skipped (the device may still boot without it). Raises DeviceError
    when there is no list.
    """
    from pvpy.device import _linux

    try:
        listed = (moddir / MODULES_LOAD_LIST).read_text().split()
    except OSError as e:
        raise DeviceError(f"{moddir / MODULES_LOAD_LIST}: {e.strerror}") from e
    skipped = {_name(s) for s in skip}
    loaded: list[str] = []
    for rel in listed:
        name = _name(os.path.basename(rel)[:-3])
        if name in skipped:
            continue
        fd = os.open(moddir / rel, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _linux.finit_module(fd)
        except OSError as e:
            if e.errno != errno.EEXIST:
                from pvpy.log import get_logger

                get_logger("modules").warning("module not loaded", module=name, error=str(e))
                continue
        finally:
            os.close(fd)
        loaded.append(name)
    return loaded
