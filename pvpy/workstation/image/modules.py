"""Kernel modules without depmod: the load order the image ships (workstation side).

Debian's kernel package ships no modules.dep and the build runs no depmod, so
``load_order`` reads each ``.ko``'s ``.modinfo`` strings (``depends=``) and
lists the wanted modules with their dependencies first. The image writes that
list to ``lib/modules/<version>/`` as ``pvpy.paths.MODULES_LOAD_LIST``; PID 1
loads it in order (``pvpy.device.board.modules.load_listed``). There is no
/sbin/modprobe for the kernel's request_module either, so anything the kernel
would ask for by itself (crc32c for ext4) must be in the board's list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from pvpy.errors import DeviceError

__all__ = ["load_order"]

_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def _name(module: str) -> str:
    """The kernel's name of a module: '-' and '_' are the same to it."""
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
