"""Processes PID 1 starts and never becomes: short-lived children, long-running helpers.

A short-lived child (the boot verifier, the Pi's write-boot) does heavy work
(crypto, hashing, copying) outside PID 1; ``start_child`` hands its result to a
done-callback from the loop. A helper (the API server, the registry puller)
runs for as long as the device and is restarted with backoff: a hostile
client or a hung registry can at worst take that process down, never stall
PID 1's loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pvpy import paths
from pvpy.device.pid1.loop import Loop
from pvpy.device.pid1.options import Options
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

log = get_logger("init")

Done = Callable[[int, str | None], None]  # (revision, problem or None when it exited 0)


def start_child(loop: Loop, argv: list[str], revision: int, done: Done) -> None:
    """Run ``argv``; ``done(revision, problem)`` from the loop when it exits
    (problem: the last line of its stderr, None when it exited 0)."""
    from pvpy import _run

    read_fd, write_fd = os.pipe()
    try:
        pid = _run.spawn(argv, stderr=write_fd, new_session=False)
    except Exception as e:
        os.close(read_fd)
        done(revision, str(e))
        return
    finally:
        os.close(write_fd)
    os.set_blocking(read_fd, False)

    def exited(status: int) -> None:
        try:
            output = os.read(read_fd, 65536)  # one error line: fits the pipe
        except OSError:
            output = b""
        os.close(read_fd)
        problem = None
        if status != 0:
            lines = output.decode(errors="replace").strip().splitlines()
            problem = lines[-1] if lines else f"verifier {os.waitstatus_to_exitcode(status)}"
        done(revision, problem)

    loop.watch_child(pid, exited)


class Helper:
    """A long-running helper process PID 1 keeps alive, restarted with backoff."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "pvpy", *argv]
        self.pid: int | None = None
        self.next_start = 0.0
        self.failures = 0

    def ensure(self, loop: Loop, now: float) -> None:
        """Start it if it is not running and its backoff has passed."""
        if self.pid is not None or now < self.next_start:
            return
        from pvpy import _run

        try:
            self.pid = _run.spawn(self.argv, new_session=True)
            log.info("helper started", helper=self.name, pid=self.pid)
        except Exception as e:
            log.error("helper cannot start", helper=self.name, error=str(e))
            self.exited(None)
            return
        loop.watch_child(self.pid, self.exited)

    def exited(self, status: int | None) -> None:
        if status is not None:
            log.warning("helper exited", helper=self.name,
                        status=os.waitstatus_to_exitcode(status))  # fmt: skip
        self.pid = None
        self.failures += 1
        self.next_start = time.monotonic() + min(2 ** min(self.failures, 5), 30)

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)


class Helpers:
    """The helpers of this device (none until the storage is mounted and read)."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.helpers: list[Helper] = []

    def ensure(self, now: float) -> None:
        for helper in self.helpers:
            helper.ensure(self.loop, now)

    def next_start(self) -> float | None:
        """When a stopped helper is due to start again."""
        return min((h.next_start for h in self.helpers if h.pid is None), default=None)

    def stop(self) -> None:
        for helper in self.helpers:
            helper.stop()

    def all_stopped(self) -> bool:
        return all(h.pid is None for h in self.helpers)


def helper_processes(options: Options, storage: Path, run_dir: Path) -> list[Helper]:
    """The long-running helpers this device is configured for (read after the
    storage is mounted): the API server, the registry puller."""
    base = ["--storage", str(storage), "--run-dir", str(run_dir)]
    helpers = []
    if options.api or options.api_tcp:
        argv = ["device", "api", *base]
        if options.api_tcp:
            argv += ["--tcp", options.api_tcp, "--token-file", str(storage / paths.API_TOKEN)]
            if options.api_plain_http:
                argv.append("--plain-http")
        helpers.append(Helper("api server", argv))
    pull = pull_config(options, storage)
    if pull is not None:
        argv = ["device", "pull", *base, "--from", str(pull["from"]),
                "--interval", str(pull.get("interval", 60))]  # fmt: skip
        if pull.get("plain_http"):
            argv.append("--plain-http")
        helpers.append(Helper("registry puller", argv))
    return helpers


def pull_config(options: Options, storage: Path) -> dict[str, Any] | None:
    """--pull REF on the command line, else STORAGE/config/pull.json."""
    if options.pull:
        return {"from": options.pull, "interval": options.pull_interval,
                "plain_http": options.pull_plain_http}  # fmt: skip
    try:
        config = json.loads((storage / paths.PULL_CONFIG).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("config/pull.json unreadable; not pulling", error=str(e))
        return None
    if not isinstance(config, dict) or not isinstance(config.get("from"), str):
        log.error('config/pull.json needs a "from" registry reference; not pulling')
        return None
    return config
