"""Shutdown: stop the helpers and the containers (reverse order), sync, unmount in
reverse, then reboot(2) — restart, halt or power off. PID 1 never exits."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from pvpy.device import _linux
from pvpy.device.pid1.children import Helpers
from pvpy.device.pid1.mounts import Mounts
from pvpy.device.pid1.watchdog import Watchdog
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import NoReturn

    from pvpy.device.supervisor import Supervisor

log = get_logger("init")

SIGNAL_ACTIONS = {
    signal.SIGTERM: "reboot",
    signal.SIGINT: "reboot",  # ctrl-alt-del
    signal.SIGUSR1: "halt",
    signal.SIGUSR2: "poweroff",
    signal.SIGPWR: "poweroff",
}
REBOOT_COMMANDS = {
    "reboot": _linux.RB_AUTOBOOT,
    "halt": _linux.RB_HALT_SYSTEM,
    "poweroff": _linux.RB_POWER_OFF,
}
SHUTDOWN_GRACE = 10.0  # seconds beyond the longest container stop timeout


class Shutdown:
    """The shutdown under way, if any (at most one: later requests are ignored)."""

    def __init__(self) -> None:
        self.action: str | None = None  # reboot / halt / poweroff in progress
        self.reason = ""
        self.argument: str | None = None  # reboot(2) RESTART2's (the Pi's tryboot)
        self.deadline = 0.0

    def request(
        self,
        action: str,
        reason: str,
        argument: str | None,
        helpers: Helpers,
        supervisor: Supervisor | None,
    ) -> None:
        """Stop everything, then reboot/halt/power off (``argument``: reboot(2)'s
        RESTART2 string, e.g. the Pi's "0 tryboot")."""
        if self.action is not None:
            return
        log.info("shutdown requested", action=action, reason=reason, argument=argument)
        self.action = action
        self.argument = argument
        self.reason = reason
        helpers.stop()
        longest = 0.0
        if supervisor is not None:
            longest = supervisor.longest_stop_timeout()
            supervisor.stop_all()
        self.deadline = time.monotonic() + longest + SHUTDOWN_GRACE

    def due(self, now: float, helpers: Helpers, supervisor: Supervisor | None) -> bool:
        """Everything stopped, or the deadline passed: time to ``finish``."""
        if self.action is None:
            return False
        stopped = (supervisor is None or supervisor.all_stopped()) and helpers.all_stopped()
        return stopped or now >= self.deadline

    def finish(
        self, supervisor: Supervisor | None, watchdog: Watchdog, mounts: Mounts, sandbox: bool
    ) -> NoReturn:
        action = self.action or "reboot"
        log.info("containers stopped", action=action)
        os.sync()
        if supervisor is not None:
            # a board's cgroups vanish with it; the sandbox host's do not
            supervisor.release(remove_cgroups=sandbox)
        if action != "reboot":
            watchdog.disarm()
        mounts.unmount_all()
        os.sync()
        log.info("goodbye", action=action)
        reboot(action, self.argument, sandbox)


def route_ctrl_alt_del() -> None:
    """Have the kernel send ctrl-alt-del to PID 1 as SIGINT instead of rebooting at once."""
    with contextlib.suppress(OSError):
        _linux.reboot(0)  # LINUX_REBOOT_CMD_CAD_OFF


def reboot(action: str, argument: str | None, sandbox: bool) -> NoReturn:
    cmd = REBOOT_COMMANDS[action]
    if sandbox and _same_pid_ns_as_host():
        # Never reboot the machine we are a guest on.
        log.error("sandbox is not in its own pid namespace; exiting instead of reboot(2)")
        os._exit(3)
    if action == "reboot" and argument:
        try:
            _linux.reboot_with_argument(argument)
        except OSError as e:  # a plain restart boots the committed revision: safe
            log.error("reboot(2) with an argument failed; plain restart",
                      argument=argument, error=str(e))  # fmt: skip
    while True:
        try:
            _linux.reboot(cmd)
        except OSError as e:
            log.error("reboot(2) failed; retrying", error=str(e))
        time.sleep(1)


def _same_pid_ns_as_host() -> bool:
    host = os.environ.get("PVPY_HOST_PIDNS")
    try:
        mine = os.readlink("/proc/self/ns/pid")
    except OSError:
        return True
    return host is None or host == mine
