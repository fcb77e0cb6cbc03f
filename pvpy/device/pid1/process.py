"""PID 1's parts wired together, and what one turn of its loop does.

Duties, in order (``Pid1.run``):

1. early mounts (``mounts``);
2. signals through the loop's wakeup fd (``loop``): SIGCHLD reap · SIGTERM,
   SIGINT (ctrl-alt-del) reboot · SIGUSR1 halt · SIGUSR2, SIGPWR power off ·
   anything else ignored; and the control socket (``control``);
3. on a board, its setup and the boot choice (``boot``), and the hardware
   watchdog (``watchdog``), fed from the loop only while the loop is healthy;
4. boot: verify the chosen revision in a child, fall back, start its
   containers (``boot``), and the helpers (``children``);
5. the loop (``step``): wait until an fd is readable or the next deadline,
   reap, let the supervisor and the update act;
6. shutdown (``shutdown``): stop everything, unmount, reboot(2).

``Pid1`` is also what the update applier sees of PID 1
(``pvpy.device._apply_host.ApplyHost``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from pvpy import paths
from pvpy.device.apply import Applier
from pvpy.device.pid1 import control, mounts
from pvpy.device.pid1.boot import Boot
from pvpy.device.pid1.children import Done, Helpers, helper_processes
from pvpy.device.pid1.loop import Loop, run_forever
from pvpy.device.pid1.options import Options
from pvpy.device.pid1.shutdown import SIGNAL_ACTIONS, Shutdown, route_ctrl_alt_del
from pvpy.device.pid1.watchdog import Watchdog
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import NoReturn

    from pvpy.device.bootenv import BootEnv
    from pvpy.device.supervisor import Supervisor

log = get_logger("init")

# SIGCHLD only wakes the loop (it reaps after every wake-up); SIGHUP is ignored.
HANDLED_SIGNALS = (*SIGNAL_ACTIONS, signal.SIGCHLD, signal.SIGHUP)


class Pid1:
    """The first process: it must never exit and never die."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.sandbox = options.sandbox
        self.storage = Path(options.storage)
        self.run_dir = Path(options.run_dir)
        self.booted_at = time.monotonic()
        self.fault: str | None = None  # injected by tests: "raise", "hang" or "bad-fd"
        self.loop = Loop()
        self.loop.unclaimed = self._container_exited
        self.mounts = mounts.Mounts()
        self.watchdog = Watchdog(options.watchdog, options.watchdog_interval)
        self.helpers = Helpers(self.loop)
        self.shutdown = Shutdown()
        self.control = control.ControlServer(self.loop, lambda r: control.dispatch(self, r))
        self.updates = Applier(self)
        self.boot = Boot(options, self.loop, on_booted=self.updates.reconcile,
                         on_device_request=self.on_device_request)  # fmt: skip
        self.storage_lock: int | None = None  # on a board (see ``lock_storage``)

    def run(self) -> NoReturn:
        try:
            mounts.early_mounts(self.mounts, self.sandbox, self.run_dir)
            self.loop.install_signals(HANDLED_SIGNALS, self.on_signal)
            if not self.sandbox:
                route_ctrl_alt_del()
            self.control.open(paths.control_socket(self.run_dir))
        except Exception:
            log.exception("early setup failed; going on")
        if self.options.board and not self.sandbox:
            try:
                self.setup_board(self.options.board)
            except Exception:
                log.exception("board setup failed; going on")
        if not self.sandbox:
            self.lock_storage()
        try:
            self.boot.prepare()
            self.helpers.helpers = helper_processes(self.options, self.storage, self.run_dir)
            self.boot.start()
        except Exception:
            log.exception("boot failed; staying up without containers")
        run_forever(self.step, self.watchdog)

    def setup_board(self, board_file: str) -> None:
        """The board's setup and boot choice; then the watchdog is opened again:
        its driver is one of the modules the board loads."""
        from pvpy.device import board

        config = self.boot.setup_board(board_file, self.mounts)
        if self.watchdog.fd is None and self.options.watchdog:
            board.wait_for(self.options.watchdog, config.watchdog_timeout)
            self.watchdog = Watchdog(self.options.watchdog, self.options.watchdog_interval)

    def lock_storage(self) -> None:
        """On a board PID 1 is the device: it holds the storage's device lock (the
        sandbox's launcher holds it there), so a sandbox run against this storage
        mounted elsewhere is refused. Not getting it is logged; PID 1 boots anyway."""
        from pvpy.device.storagelock import lock_storage
        from pvpy.errors import PvpyError

        try:
            self.storage_lock = lock_storage(self.storage)
        except PvpyError as e:
            log.error("storage lock not taken; booting anyway", error=str(e))

    def release_storage_lock(self) -> None:
        """Before the storage is unmounted: an open fd would keep it busy."""
        if self.storage_lock is not None:
            with contextlib.suppress(OSError):
                os.close(self.storage_lock)
            self.storage_lock = None

    # -- the loop --------------------------------------------------------------------

    def step(self) -> None:
        """One turn: wait for an event or the next deadline, reap, then let
        everything do what is due."""
        if self.fault == "raise":
            self.fault = None
            raise RuntimeError("injected fault")
        if self.fault == "hang":
            time.sleep(3600)  # a wedged loop: the watchdog must stop being fed
        supervisor = self.supervisor
        if supervisor is not None:
            if self.fault == "bad-fd":
                self.fault = None
                supervisor.inject_bad_fd()
            self.loop.track(supervisor.watched_fds(), supervisor.on_fd, supervisor.drop_fd)
        self.loop.wait(self.next_deadline())
        supervisor = self.supervisor  # a verifier that exited just now may have started one
        if supervisor is not None:
            supervisor.tick()
        now = time.monotonic()
        self.updates.check(now)
        self.updates.check_health()
        if self.shutdown.action is None:
            self.helpers.ensure(now)
        self.control.expire(now)
        if self.shutdown.due(now, self.helpers, self.supervisor):
            self.release_storage_lock()
            self.shutdown.finish(self.supervisor, self.watchdog, self.mounts, self.sandbox)

    def next_deadline(self) -> float | None:
        """The earliest time something is due; None: nothing is, sleep until an event."""
        supervisor = self.supervisor
        deadlines = [
            supervisor.next_deadline() if supervisor is not None else None,
            self.updates.next_deadline(),
            self.control.next_deadline(),
            self.watchdog.next_feed(),
        ]
        if self.shutdown.action is None:
            deadlines.append(self.helpers.next_start())
        else:
            deadlines.append(self.shutdown.deadline)
        return min((d for d in deadlines if d is not None), default=None)

    def _container_exited(self, pid: int, status: int) -> bool:
        supervisor = self.supervisor
        return supervisor is not None and supervisor.on_exit(pid, status)

    # -- requests -----------------------------------------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        action = SIGNAL_ACTIONS.get(sig)
        if action is None:
            log.info("signal ignored", signal=sig.name)
        else:
            self.request(action, f"signal {sig.name}")

    def on_device_request(self, action: str, reason: str) -> None:
        """The supervisor asks for a reboot/power off (the host OS ended or failed).

        While an update is testing, that is the update failing: record it and
        roll back first, so the next boot does not try it again.
        """
        u = self.updates.update
        if u is not None and u.phase == "testing" and action == "reboot":
            self.updates.fail(u, reason)
        self.request(action, reason)

    def request(self, action: str, reason: str, argument: str | None = None) -> None:
        """Stop everything, then reboot/halt/power off (see ``Shutdown.request``)."""
        self.shutdown.request(action, reason, argument, self.helpers, self.supervisor)

    # -- what the update applier sees (pvpy.device._apply_host.ApplyHost) ------------------

    @property
    def bootenv(self) -> BootEnv:
        if self.boot.bootenv is None:
            raise RuntimeError("no boot environment is open yet")
        return self.boot.bootenv

    @property
    def supervisor(self) -> Supervisor | None:
        return self.boot.supervisor

    @property
    def boot_revision(self) -> int | None:
        return self.boot.boot_revision

    @property
    def boot_trying(self) -> bool:
        return self.boot.trying

    @property
    def failed_try(self) -> int | None:
        return self.boot.failed_try

    @property
    def failed_try_reason(self) -> str | None:
        return self.boot.failed_try_reason

    @property
    def commit_delay(self) -> float:
        return self.options.commit_delay

    @property
    def commit_timeout(self) -> float:
        return self.options.commit_timeout

    @property
    def shutdown_pending(self) -> bool:
        return self.shutdown.action is not None

    @property
    def revision(self) -> int | None:
        return self.boot.revision

    def set_revision(self, revision: int) -> None:
        self.boot.revision = revision

    def start_verify(self, revision: int, done: Done) -> None:
        self.boot.start_verify(revision, done)

    def start_write_boot(self, revision: int, done: Done) -> None:
        self.boot.start_write_boot(revision, done)
