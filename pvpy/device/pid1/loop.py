"""PID 1's event loop, about tini's size: one selector, signals, reaping, deadlines.

Why a wakeup fd and a selector, not ``signal.sigtimedwait`` (tini's way):
sigtimedwait waits for signals only, and PID 1 must wait on the control
socket, container output pipes, notify FIFOs and signals at once. With
sigtimedwait it would have to poll those fds with a timeout, i.e. wake
periodically. ``signal.set_wakeup_fd`` turns signals into one more readable
fd: the C-level handler writes the signal number into a pipe, and one
``select`` waits for everything until the next deadline, and no longer. An
idle PID 1 sleeps until something happens or something is due (there is no
tick). The Python-level handlers do nothing; the loop reads the numbers from
the pipe and acts in plain code.

Reaping: after every wake-up, ``waitpid(-1, WNOHANG)`` until nothing is left
(one SIGCHLD may stand for many exits, and orphans re-parented to PID 1 must
not stay zombies). Each pid goes to the callback registered for it (helpers,
verifier children); the rest to the fallback (the supervisor, which knows its
containers' pids), and anything else is just reaped.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Callable, Iterable

from pvpy.device.pid1.watchdog import Watchdog
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    import socket
    from typing import NoReturn

log = get_logger("init")

WEDGED_AFTER = 5  # consecutive failed loop iterations: stop feeding the watchdog

FdCallback = Callable[[int], None]  # called with the readable fd
ExitCallback = Callable[[int], None]  # called with the wait status


def _noop(_signum: int, _frame: object) -> None:
    """Signals only wake the loop (through the wakeup fd); the loop acts."""


class Loop:
    """The selector, the signal pipe and the pid -> callback table."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, ExitCallback] = {}
        # pids nobody registered: the supervisor's containers and readiness checks
        self.unclaimed: Callable[[int, int], bool] = lambda _pid, _status: False
        self._on_signal: Callable[[signal.Signals], None] = lambda _sig: None
        self._tracked: dict[int, int] = {}  # fd -> token, see ``track``
        self._refused: dict[int, int] = {}  # fd -> token the selector would not take
        self._on_refused: FdCallback | None = None  # the owner of the tracked fds

    # -- registration ------------------------------------------------------------

    def watch(self, fileobj: int | socket.socket, callback: FdCallback) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def unwatch(self, fileobj: int | socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(fileobj)

    def watch_child(self, pid: int, callback: ExitCallback) -> None:
        """``callback(status)`` from the loop when ``pid`` exits."""
        self.children[pid] = callback

    def track(
        self, wanted: dict[int, int], callback: FdCallback, refused: FdCallback | None = None
    ) -> None:
        """Keep the selector watching exactly ``wanted`` (fd -> token) for ``callback``.

        Container output pipes and notify FIFOs come and go with containers;
        each open fd carries a token, so a reused fd number is registered anew.
        An fd the selector will not take (epoll refuses a regular file: EPERM;
        a closed one: EBADF) is logged once and handed to ``refused`` for its
        owner to drop; the others are served as ever. Raising here instead
        would fail every pass of PID 1's loop: no control socket, no watchdog.
        """
        self._on_refused = refused
        for fd, token in list(self._tracked.items()):
            if wanted.get(fd) != token:
                self.unwatch(fd)
                del self._tracked[fd]
        for fd in [fd for fd, token in self._refused.items() if wanted.get(fd) != token]:
            del self._refused[fd]
        for fd, token in wanted.items():
            if fd in self._tracked or self._refused.get(fd) == token:
                continue
            self.unwatch(fd)  # a stale entry under a reused number
            try:
                self.watch(fd, callback)
            except (OSError, ValueError) as e:
                self._refused[fd] = token
                log.error("fd refused by the selector; dropped", fd=fd, error=str(e))
                self._drop(fd, refused)
                continue
            self._tracked[fd] = token

    def _drop(self, fd: int, owner: FdCallback | None) -> None:
        """Tell the owner of a tracked fd that PID 1 no longer serves it."""
        if owner is None:
            return
        try:
            owner(fd)
        except Exception:
            log.exception("dropping an fd failed", fd=fd)

    def install_signals(
        self, signals: Iterable[signal.Signals], on_signal: Callable[[signal.Signals], None]
    ) -> None:
        """Deliver ``signals`` through the wakeup pipe; ``on_signal`` runs from the loop."""
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for sig in signals:
            signal.signal(sig, _noop)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._on_signal = on_signal
        self.watch(read_fd, self._read_signals)

    def _read_signals(self, fd: int) -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum != signal.SIGCHLD:  # reaping follows every wake-up anyway
                self._on_signal(signal.Signals(signum))

    # -- one wait ----------------------------------------------------------------------

    def wait(self, deadline: float | None) -> None:
        """Sleep until an fd is readable or ``deadline`` (None: until an event),
        run the callbacks of the ready fds, then reap."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        for key, _ in self.selector.select(timeout):
            try:
                key.data(key.fd)
            except Exception:
                # One failing callback must not starve the others (nor the reaping).
                # A container's fd that keeps failing would wake us at once, again
                # and again: its owner drops it. PID 1's own fds stay watched.
                log.exception("fd callback failed", fd=key.fd)
                if key.fd in self._tracked:
                    self.unwatch(key.fd)
                    self._refused[key.fd] = self._tracked.pop(key.fd)
                    self._drop(key.fd, self._on_refused)
        self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            callback = self.children.pop(pid, None)
            if callback is not None:
                callback(status)
            elif not self.unclaimed(pid, status):
                log.debug("reaped", pid=pid, status=status)


def run_forever(step: Callable[[], None], watchdog: Watchdog) -> NoReturn:
    """Run ``step`` forever. An exception in one iteration is logged and the loop
    goes on; after WEDGED_AFTER failures in a row the watchdog is no longer fed,
    so a board whose PID 1 is stuck resets."""
    failures = 0
    while True:
        try:
            step()
            failures = 0
        except Exception:
            failures += 1
            log.exception("loop iteration failed; going on", failures=failures)
            time.sleep(min(0.1 * failures, 1.0))  # no busy spin on a stuck error
        if failures < WEDGED_AFTER:
            watchdog.feed(time.monotonic())
        elif failures == WEDGED_AFTER:
            log.error("supervisor wedged: no longer feeding the watchdog")
