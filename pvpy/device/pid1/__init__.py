"""``pvpy init``: the first process. It must never exit and never die.

A package, one concern a module: ``options`` (flags), ``mounts`` (early
mounts, cgroups), ``watchdog``, ``loop`` (the event loop: selector, signals,
reaping), ``children`` (helpers, short-lived children), ``control`` (the
control socket), ``boot`` (boot choice, verifying, the supervisor),
``shutdown`` (reboot(2)); ``process`` wires them together (``Pid1``).

Only the standard library and pvpy's lean modules are imported here:
tests/test_init.py checks what PID 1 has loaded.
"""

from __future__ import annotations

import os
import sys

from pvpy.device.pid1.options import parse_options, usage
from pvpy.device.pid1.process import Pid1
from pvpy.log import configure, get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = ["main"]

log = get_logger("init")


def main(argv: list[str]) -> NoReturn:
    args, problems = parse_options(argv)
    if os.getpid() != 1:
        if "-h" in argv or "--help" in argv:
            sys.stdout.write(usage())
            sys.exit(0)
        for problem in problems:
            sys.stderr.write(f"pvpy init: {problem}\n")
        # Device mode ends in reboot(2): on a workstation that would reboot it.
        sys.stderr.write("pvpy init: not PID 1; use `pvpy device run` for a sandbox\n")
        sys.exit(2)
    configure(lean=True, json=True, level=args.log_level)
    os.environ["PVPY_LOG_JSON"] = "1"  # the helpers it starts log JSON lines too
    for problem in problems:
        log.error("bad argument; going on without it", problem=problem)
    if args.board and not args.sandbox:
        from pvpy.device.board import leave_rootfs

        try:
            leave_rootfs()  # before anything opens a path: crun's pivot_root needs it
        except OSError as e:
            log.error("cannot leave the initramfs rootfs; containers will fail", error=str(e))
    Pid1(args).run()
