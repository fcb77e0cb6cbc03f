"""Kernel modules without kmod: load order on the workstation, loading on the device.

The image build has no depmod (and Debian's kernel package ships no
modules.dep), so ``load_order`` reads each ``.ko``'s ``.modinfo`` strings
(``depends=``) and lists the wanted modules with their dependencies first. The
image writes that list to ``lib/modules/<version>/load.list``; ``load_listed``
then loads it on the device with finit_module(2), in order. There is no
/sbin/modprobe for the kernel's request_module either, so anything the kernel
would ask for by itself (crc32c for ext4) must be in the list.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pvpy.errors import DeviceError

LOAD_LIST = "load.list"
_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")

__all__ = ["LOAD_LIST", "load_listed", "load_order"]


def _name(module: str) -> str:
    return module.replace("-", "_")


def _index(moddir: Path) -> dict[str, Path]:
    return {_name(p.name[:-3]): p for p in sorted(moddir.rglob("*.ko"))}


def _depends(path: Path) -> list[str]:
    match = _DEPENDS.search(path.read_bytes())
    if not match or not match.group(1):
        return []
    return [_name(d.decode()) for d in match.group(1).split(b",") if d]


def load_order(moddir: Path, wanted: Iterable[str]) -> list[str]:
    """Paths (relative to ``moddir``) of ``wanted`` and their dependencies, deps first.

    Raises DeviceError for a module the kernel package does not have (it may be
    built in: see modules.builtin).
    """
    mods = _index(moddir)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in mods:
            raise DeviceError(f"kernel module {name} not found in {moddir} (built in?)")
        for dep in _depends(mods[name]):
            visit(dep)
        order.append(str(mods[name].relative_to(moddir)))

    for module in wanted:
        visit(_name(module))
    return order


def load_listed(moddir: Path, skip: Iterable[str] = ()) -> list[str]:
    """Load every module of ``moddir/load.list`` in order; return the names loaded.

    A module that is loaded already counts as loaded; one that fails is logged
    and skipped (the device may still boot without it). Raises DeviceError
    when there is no list.
    """
    from pvpy.device import _linux

    try:
        listed = (moddir / LOAD_LIST).read_text().split()
    except OSError as e:
        raise DeviceError(f"{moddir / LOAD_LIST}: {e.strerror}") from e
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
